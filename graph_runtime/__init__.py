"""The graph runtime: node schema, workflow JSON, networkx DAG, validation, caching executor.

torch-free, and imports nothing of LoRA Loom beyond itself.
"""

from .cache import CacheStore, estimate_nbytes
from .context import ExecutionContext, current_context
from .errors import (ExecutionError, Interrupted, LoomError, PathError, SchemaError, ValidationError,
                     WorkflowError)
from .executor import RunResult, Runtime
from .paths import TEMP_SUBFOLDER, Folders, check_relative_name, resolve_under
from .schema import Boolean, Combo, Float, Input, Int, Link, NodeRegistry, NodeSchema, Output, String, node
from .workflow import Workflow, load_workflow

__all__ = [
    "Boolean", "CacheStore", "Combo", "ExecutionContext", "ExecutionError", "Float", "Folders", "Input", "Int",
    "Interrupted", "Link", "LoomError", "NodeRegistry", "NodeSchema", "Output", "PathError", "RunResult",
    "Runtime", "SchemaError", "String", "TEMP_SUBFOLDER", "ValidationError", "Workflow", "WorkflowError",
    "check_relative_name", "current_context", "estimate_nbytes", "load_workflow", "node", "resolve_under",
]
