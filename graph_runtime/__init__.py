"""The graph runtime: node schema, workflow JSON, networkx DAG, validation, caching executor.

torch-free, and imports nothing of LoRA Loom beyond itself.
"""

from .cache import (HASH_CHUNK_BYTES, CacheStore, Footprint, KnownFingerprint, estimate_nbytes, file_fingerprint,
                    file_hasher, footprint, known_fingerprint, remember_fingerprint)
from .context import ExecutionContext, current_context
from .errors import (ExecutionError, InputError, Interrupted, LoomError, PathError, SchemaError, ValidationError,
                     WorkflowError)
from .executor import RunResult, Runtime
from .files import FileError, FileState, open_regular
from .limits import Limits
from .paths import TEMP_SUBFOLDER, Folders, check_relative_name, resolve_under
from .schema import Boolean, Combo, Float, Input, Int, Link, NodeRegistry, NodeSchema, Output, String, node
from .workflow import Workflow, is_link, load_workflow, parse_axis, parse_seeds

__all__ = [
    "HASH_CHUNK_BYTES", "TEMP_SUBFOLDER", "Boolean", "CacheStore", "Combo", "ExecutionContext", "ExecutionError",
    "FileError", "FileState", "Float", "Folders", "Footprint", "Input", "InputError", "Int", "Interrupted",
    "KnownFingerprint", "Limits", "Link", "LoomError", "NodeRegistry", "NodeSchema", "Output", "PathError",
    "RunResult", "Runtime", "SchemaError", "String", "ValidationError", "Workflow", "WorkflowError",
    "check_relative_name", "current_context", "estimate_nbytes", "file_fingerprint", "file_hasher", "footprint",
    "is_link", "known_fingerprint", "load_workflow", "node", "open_regular", "parse_axis", "parse_seeds",
    "remember_fingerprint", "resolve_under",
]
