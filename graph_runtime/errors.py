"""The one error family of LoRA Loom. Torch-free and imports nothing else of ours: every layer
(graph_runtime, lora, bases, server, the CLI, ComfyUI's adapter) raises and renders these.

Every error carries the same fields, so the CLI, the server and ComfyUI show the same facts and
no caller needs to read the message to decide what happened:

- where: ``file``, ``node`` (with ``class_type``), ``input``, ``key`` (each None when it does not apply)
- ``value`` (what was found), ``limit`` (what was allowed or expected), ``fix`` (advice or None)
- ``kind``: a short stable code (``"not_finite"``, ``"outside_root"``, ...) for callers that must tell
  cases apart; branch on it, never on the text.

``str(exc)`` is :meth:`LoomError.render`: ``<file>: node 7 (WeightedBlend) input 'weight': <message>
Fix: <fix>``, rendered from the fields at the time it is shown, so a caller that adds the file or
node on the way up (:meth:`LoomError.at`) keeps the fix and every other field.

The package's classes report their module as ``loraloom`` (each is importable as ``loraloom.<Name>``), so
ComfyUI, which prints ``type.__module__ + "." + type.__qualname__`` and imports a custom node pack
under its folder path, shows ``loraloom.PathError`` rather than a filesystem path.
"""

from __future__ import annotations

from typing import Any

PUBLIC_MODULE = "loraloom"
# The name this package was imported under: "loraloom", or inside ComfyUI the pack's folder path.
_PACKAGE = __name__.rpartition(".graph_runtime.errors")[0]
WHERE_FIELDS = ("file", "node", "class_type", "input", "key")
FIELDS = (*WHERE_FIELDS, "value", "limit", "fix", "kind")


def show(value: Any, length: int = 200) -> str:
    """``repr(value)``, cut to ``length`` characters: keys and values from files can be huge."""
    text = repr(value)
    return text if len(text) <= length else text[: length - 3] + "..."


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return show(value)


def _rebuild(cls: type, state: dict) -> "LoomError":
    exc = cls.__new__(cls)
    exc.__dict__.update(state)
    exc.args = (exc.render(),)
    return exc


class LoomError(Exception):
    """Base class of every error LoRA Loom raises on purpose. See the module docstring for the fields.

    ``key_label`` names what ``key`` is (``"tensor"``, ``"metadata key"``) when the location should
    show it; without one the message itself names the key.
    """

    kind = "error"

    def __init__(self, message: str = "", *, file: Any = None, node: str | None = None,
                 class_type: str | None = None, input: str | None = None, key: str | None = None,
                 key_label: str | None = None, value: Any = None, limit: Any = None, fix: str | None = None,
                 kind: str | None = None):
        self.message = message
        self.file = None if file is None else str(file)
        self.node = None if node is None else str(node)
        self.class_type = class_type
        self.input = input
        self.key = key
        self.key_label = key_label
        self.value = value
        self.limit = limit
        self.fix = fix.removeprefix("Fix: ") if fix else None
        if kind is not None:
            self.kind = kind
        super().__init__(self.render())

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if _PACKAGE and (cls.__module__ == _PACKAGE or cls.__module__.startswith(_PACKAGE + ".")):
            cls.__module__ = PUBLIC_MODULE  # ours only; a subclass in someone's node pack keeps its module

    def where(self) -> str:
        """The location prefix: ``file: node 7 (Class) input 'x': tensor 'k': `` (only the parts set)."""
        parts = []
        if self.file:
            parts.append(f"{self.file}: ")
        if self.node is not None:
            node = f"node {self.node}" + (f" ({self.class_type})" if self.class_type else "")
            parts.append(node + (f" input '{self.input}'" if self.input else "") + ": ")
        elif self.input:
            parts.append(f"input '{self.input}': ")
        if self.key is not None and self.key_label:
            parts.append(f"{self.key_label} {show(self.key)}: ")
        return "".join(parts)

    def render(self) -> str:
        """The one-line text every surface shows: location, message, then ``Fix:``."""
        text = self.where() + self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return text

    def __str__(self) -> str:
        return self.render()

    def __reduce__(self):
        # Subclasses have their own positional arguments; rebuilding from the fields works for all.
        return (_rebuild, (type(self), dict(self.__dict__)))

    def at(self, **where: Any) -> "LoomError":
        """Fill location fields that are still unset (``file=``, ``node=``, ...) and return self, so
        a caller that knows more re-raises the same error: ``raise exc.at(file=path)``."""
        unknown = set(where) - set(WHERE_FIELDS)
        if unknown:
            raise TypeError(f"at() takes {', '.join(WHERE_FIELDS)}; not {', '.join(sorted(unknown))}")
        for name, value in where.items():
            if getattr(self, name) is None and value is not None:
                setattr(self, name, value if name in ("class_type", "input", "key") else str(value))
        self.args = (self.render(),)
        return self

    def fields(self) -> dict:
        """The fields as JSON-safe values (None ones left out): what the server adds to an error's
        ``extra_info``."""
        out = {name: _json_safe(getattr(self, name)) for name in FIELDS}
        out["message"] = self.message
        out["type"] = f"{PUBLIC_MODULE}.{type(self).__name__}"
        return {k: v for k, v in out.items() if v is not None}


LoomError.__module__ = PUBLIC_MODULE


class SchemaError(LoomError, TypeError):
    """A declaration contradicts itself or the code it declares: a node's inputs and its execute
    function, a merge method and its combination (raised at import or registration). Also a
    TypeError, what Python itself raises for a definition that does not fit its use."""


class WorkflowError(LoomError, ValueError):
    """A workflow file or dict cannot be read: bad JSON, wrong shape, limits exceeded."""


class PathError(LoomError, ValueError):
    """A file name escapes its configured root or cannot be found there."""


class InputError(LoomError, ValueError):
    """A value a user gave is outside what it may be: a node input checked while the node runs, a
    setting such as the cache budget (``--cache-bytes``) or a reader's limits. ``value`` is what was
    given, ``limit`` what is allowed; ``input`` or ``key`` names the setting."""


class ValidationError(LoomError):
    """A workflow failed validation. Holds every problem found, in ComfyUI's shape.

    ``error`` is the top-level error dict (``{"type", "message", "details", "extra_info"}``) and
    ``node_errors`` maps node id to ``{"class_type", "errors": [...], "dependent_outputs": [...]}``.
    """

    kind = "invalid_prompt"

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
    """A node raised while executing. Names node id, class and the cause.

    When the cause is one of ours its fields (file, input, key, value, limit, fix, kind) are kept
    here too; its text, fix included, is already in ``message``. ``cause_fields`` is the cause's
    :meth:`LoomError.fields` (empty for a cause that is not ours): the ``extra_info`` of the event.
    """

    kind = "node_failed"

    def __init__(self, node_id: str, class_type: str, message: str, *, exception_type: str = "",
                 traceback: list[str] | None = None, inputs: dict | None = None,
                 cause: BaseException | None = None):
        self.node_id = node_id
        self.exception_type = exception_type
        self.traceback = traceback or []
        self.inputs = inputs or {}
        carried = {}
        self.cause_fields = {}
        if isinstance(cause, LoomError):
            carried = {name: getattr(cause, name) for name in ("file", "input", "key", "key_label", "value",
                                                               "limit", "fix", "kind")}
            self.cause_fields = cause.fields()
        super().__init__(message, node=node_id, class_type=class_type, **carried)

    def render(self) -> str:
        # The cause's own text (with its Fix:) is the message; rendering the fix again would repeat it.
        return f"node {self.node} ({self.class_type}) failed: {self.message}"

    def to_json(self) -> dict:
        """The payload of an ``execution_error`` event: ComfyUI's keys, plus ``extra_info`` holding
        the cause's fields. ComfyUI's frontend (1.58) passes the event on as it came and reads its
        keys by name, and its jobs API schema lets unknown keys through, so one more key is safe."""
        return {
            "node_id": self.node_id,
            "node_type": self.class_type,
            "exception_message": self.message,
            "exception_type": self.exception_type,
            "traceback": self.traceback,
            "current_inputs": self.inputs,
            "extra_info": self.cause_fields,
        }


class Interrupted(LoomError):
    """The run was interrupted (cooperatively: between nodes, steps or layers)."""

    kind = "interrupted"

    def __init__(self, node_id: str | None = None):
        self.node_id = node_id
        super().__init__("interrupted" + (f" at node {node_id}" if node_id else ""))
