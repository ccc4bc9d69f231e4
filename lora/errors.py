"""Errors of the LoRA format layer: every one names the file, the key, the value and the limit.

`LoRAFormatError` is raised while a file is read or written (unknown key forms, ranks that
disagree, unsupported kinds such as DoRA); `LoRAMatchError` when a LoRA is checked against a base
model and does not fit. Both belong to the project's one error family (`LoomError`) and are also
ValueErrors, like safefile's `LoRAFileError`, so one `except ValueError` catches every "this file is
not usable" case.
"""
from __future__ import annotations

from typing import Any

from ..graph_runtime.errors import LoomError


class LoRAError(LoomError, ValueError):
    """A LoRA that cannot be used as given.

    Fields as every `LoomError`: ``file`` (also ``path``; None for in-memory values), ``key`` (the
    offending key or module, named in the message), ``value`` (what was found), ``limit`` (what was
    allowed or expected), ``fix`` (advice or None).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        value: Any = None,
        limit: Any = None,
        fix: str | None = None,
        **where: Any,
    ):
        super().__init__(message, file=path, key=key, value=value, limit=limit, fix=fix, **where)

    @property
    def path(self) -> str | None:
        """The file the LoRA came from (the ``file`` field), or None."""
        return self.file


class LoRAFormatError(LoRAError):
    """A file's keys or tensors do not form a LoRA we can read (or a value cannot be written)."""


class LoRAMatchError(LoRAError):
    """A LoRA does not fit a base model: too few modules match, or shapes disagree.

    ``report`` holds the full `MatchReport` so callers can show every unmatched key.
    """

    def __init__(self, message: str, *, report: Any = None, **kwargs: Any):
        self.report = report
        super().__init__(message, **kwargs)
