"""The execution context a node sees while it runs: progress, interrupt, folders, shared resources.

Node functions keep ComfyUI's signature (inputs only), so the context travels in a ContextVar.
Outside a run (or inside ComfyUI) :func:`current_context` returns a default context.
"""

from __future__ import annotations

import contextvars
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import Interrupted
from .limits import Limits
from .paths import Folders


@dataclass
class ExecutionContext:
    """What a running node may use. ``resources`` holds runtime-wide objects (e.g. the model pool);
    ``limits`` bound what a workflow may ask for (validation reads them here)."""

    folders: Folders
    node_id: str | None = None
    class_type: str | None = None
    prompt: dict | None = None
    workflow: dict | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    interrupt_flag: threading.Event = field(default_factory=threading.Event)
    on_progress: Callable[[str | None, int, int], None] | None = None
    limits: Limits = field(default_factory=Limits)
    strict_files: bool = False
    """Strict file mode: readers hash what they read rather than trust a remembered digest."""
    file_reads: dict[str, str] | None = None
    """Set by the runtime for a running node: the digests of the files it read (see :meth:`report_read`)."""
    runtime: Any = None
    """The runtime running the node (None outside our runtime, e.g. inside ComfyUI). A node may call its
    ``run()``: the prompt runs nested, within the current run, on the same cache and model pool."""

    def progress(self, value: int, total: int) -> None:
        """Report progress inside the node (e.g. sampling steps) and honour an interrupt."""
        if self.on_progress is not None:
            self.on_progress(self.node_id, value, total)
        self.check_interrupt()

    def report_read(self, path, digest: str) -> None:
        """Tell the runtime the digest of the bytes this node read from ``path``, so its result is
        cached under that content, also when the file changed after the run computed its key."""
        if self.file_reads is not None:
            self.file_reads[os.path.realpath(path)] = digest

    def check_interrupt(self) -> None:
        """Raise :class:`Interrupted` if an interrupt was requested. Call it between units of work."""
        if self.interrupt_flag.is_set():
            raise Interrupted(self.node_id)


_current: contextvars.ContextVar[ExecutionContext | None] = contextvars.ContextVar("loraloom_context",
                                                                                    default=None)
_default: ExecutionContext | None = None


def current_context() -> ExecutionContext:
    """The context of the running node, or a default one built from the environment."""
    ctx = _current.get()
    if ctx is not None:
        return ctx
    global _default
    if _default is None:
        _default = ExecutionContext(folders=Folders.configure(), limits=Limits.configure())
    return _default


def set_default_context(ctx: ExecutionContext) -> None:
    """Replace the context used outside runs (ComfyUI integration sets its folders here)."""
    global _default
    _default = ctx


def use_context(ctx: ExecutionContext) -> contextvars.Token:
    return _current.set(ctx)


def reset_context(token: contextvars.Token) -> None:
    _current.reset(token)
