"""Errors of the graph runtime. Each one names the node, class and input, the value and the limit."""

from __future__ import annotations


class LoomError(Exception):
    """Base class of every error LoRA Loom raises on purpose."""


class SchemaError(LoomError):
    """A node declaration contradicts itself or its execute function (raised at import/registration)."""


class WorkflowError(LoomError, ValueError):
    """A workflow file or dict cannot be read: bad JSON, wrong shape, limits exceeded."""


class PathError(LoomError, ValueError):
    """A file name escapes its configured root or cannot be found there."""


class ValidationError(LoomError):
    """A workflow failed validation. Holds every problem found, in ComfyUI's shape.

    ``error`` is the top-level error dict (``{"type", "message", "details", "extra_info"}``) and
    ``node_errors`` maps node id to ``{"class_type", "errors": [...], "dependent_outputs": [...]}``.
    """

    def __init__(self, error: dict, node_errors: dict):
        self.error = error
        self.node_errors = node_errors
        super().__init__(self.describe())

    def describe(self) -> str:
        """All problems, one line each, as the CLI prints them."""
        lines = [self.error["message"] + (f": {self.error['details']}" if self.error.get("details") else "")]
        for node_id, entry in self.node_errors.items():
            for err in entry["errors"]:
                name = err.get("extra_info", {}).get("input_name")
                where = f"node {node_id} ({entry['class_type']})" + (f" input '{name}'" if name else "")
                lines.append(f"  {err['details'] or where + ': ' + err['message']}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The body ComfyUI answers an invalid prompt with."""
        return {"error": self.error, "node_errors": self.node_errors}


class ExecutionError(LoomError):
    """A node raised while executing. Names node id, class and the cause."""

    def __init__(self, node_id: str, class_type: str, message: str, *, exception_type: str = "",
                 traceback: list[str] | None = None, inputs: dict | None = None):
        self.node_id = node_id
        self.class_type = class_type
        self.message = message
        self.exception_type = exception_type
        self.traceback = traceback or []
        self.inputs = inputs or {}
        super().__init__(f"node {node_id} ({class_type}) failed: {message}")

    def to_json(self) -> dict:
        """The payload of an ``execution_error`` event."""
        return {
            "node_id": self.node_id,
            "node_type": self.class_type,
            "exception_message": self.message,
            "exception_type": self.exception_type,
            "traceback": self.traceback,
            "current_inputs": self.inputs,
        }


class Interrupted(LoomError):
    """The run was interrupted (cooperatively: between nodes, steps or layers)."""

    def __init__(self, node_id: str | None = None):
        self.node_id = node_id
        super().__init__("interrupted" + (f" at node {node_id}" if node_id else ""))
