"""Strict JSON for workflows from strangers: no NaN/Infinity, no duplicate keys, bounded size and depth."""

from __future__ import annotations

import json
import math
import os
from typing import Callable

from .errors import WorkflowError
from .files import FileError, read_capped

MAX_WORKFLOW_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
MAX_INT_DIGITS = 4300  # Python's own limit for int(str): longer ones raise a bare ValueError


# The JSON path of a value (keys and list indices) -> where in a workflow that is, as error fields
# (node=, class_type=, input=), or None when the path is no place a workflow names.
Locate = Callable[[object, list], "dict | None"]


class _NotFinite:
    """A NaN, Infinity or overflowing number met while parsing: left in place until the whole text is
    parsed, so the error can say where it is (which node and input), not only what it is."""

    __slots__ = ("text", "kind")

    def __init__(self, text: str, kind: str):
        self.text, self.kind = text, kind

    def error(self) -> WorkflowError:
        if self.kind == "overflow":
            return WorkflowError(f"number {self.text} is not finite (it overflows a 64-bit float); "
                                 "workflows may hold only finite numbers", value=self.text, kind="overflow")
        return WorkflowError(f"{self.text} is not a finite number; JSON workflows may hold only finite numbers",
                             value=self.text, kind="not_finite")


def json_path(path: list) -> str:
    """``["nodes", 3, "widgets_values", 1]`` -> ``$.nodes[3].widgets_values[1]`` (JSONPath's notation)."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if p.isidentifier() else f"[{json.dumps(p)}]"
                         for p in path)


def _first_not_finite(value) -> tuple[list, _NotFinite] | None:
    """The JSON path and marker of the first non-finite number in ``value``, in document order
    (iterative: no recursion)."""
    stack = [([], value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, _NotFinite):
            return path, item
        if isinstance(item, dict):
            stack.extend((path + [k], v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((path + [i], v) for i, v in reversed(list(enumerate(item))))
    return None


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise WorkflowError(f"an integer of {digits} digits is above the limit of {MAX_INT_DIGITS} digits",
                            value=text[:20] + "...", limit=MAX_INT_DIGITS, kind="overflow")
    return int(text)


def _unique_pairs(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise WorkflowError(f"duplicate key {key!r} in one JSON object; "
                                "a workflow must name each key once")
        out[key] = value
    return out


def check_depth(value, limit: int = MAX_DEPTH, source: str = "workflow") -> None:
    """Raise WorkflowError when containers nest deeper than ``limit`` (iterative: no recursion)."""
    if not isinstance(value, (dict, list, tuple)):
        return
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise WorkflowError(f"{source}: nesting depth {depth} is above the limit {limit}")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))


def loads_strict(text: str | bytes, source: str = "workflow", max_bytes: int = MAX_WORKFLOW_BYTES,
                 locate: Locate | None = None):
    """Parse JSON text, rejecting non-finite numbers, duplicate keys and absurd size or nesting.
    ``locate(document, path)`` names where in the document a non-finite number is (see ``Locate``)."""
    size = len(text)
    if size > max_bytes:
        raise WorkflowError(f"{source}: {size} bytes is above the limit of {max_bytes} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")  # a byte order mark (Windows editors write one) is not JSON's
        except UnicodeDecodeError as exc:
            raise WorkflowError(f"{source}: not UTF-8 text (byte {exc.start}); is this a JSON file?") from None
    seen: list[_NotFinite] = []  # the document is searched for where they are only when there are some

    def not_finite(literal: str, kind: str) -> _NotFinite:
        seen.append(_NotFinite(literal, kind))
        return seen[-1]

    def parse_float(literal: str):
        value = float(literal)
        return value if math.isfinite(value) else not_finite(literal, "overflow")

    try:
        value = json.loads(text, parse_constant=lambda name: not_finite(name, "not_finite"),
                           parse_float=parse_float, parse_int=_bounded_int, object_pairs_hook=_unique_pairs)
    except WorkflowError as exc:
        raise exc.at(file=source) from None
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise WorkflowError(f"{source}: nesting is deeper than the limit {MAX_DEPTH}") from None
    check_depth(value, source=source)
    found = _first_not_finite(value) if seen else None
    if found is not None:
        path, marker = found
        error = marker.error().at(file=source)
        if locate is not None and path:
            where = locate(value, path) or {}
            if "input" not in where:  # the node alone, or nothing a workflow names: the path says the rest
                error.key, error.key_label = json_path(path), "at"
            error.at(**where)
        raise error
    return value


def load_json_file(path: str | os.PathLike, max_bytes: int = MAX_WORKFLOW_BYTES, locate: Locate | None = None):
    """Read and strictly parse a JSON file: a regular file only, its size checked before reading."""
    return loads_strict(read_workflow_bytes(path, max_bytes), source=str(path), max_bytes=max_bytes, locate=locate)


def read_workflow_bytes(path: str | os.PathLike, max_bytes: int = MAX_WORKFLOW_BYTES) -> bytes:
    """The bytes of a workflow file (a regular file of at most ``max_bytes``); every problem is a
    WorkflowError naming the file."""
    try:
        return read_capped(path, max_bytes, "workflow")
    except FileError as exc:
        raise WorkflowError(exc.message, file=path, value=exc.value, limit=exc.limit, fix=exc.fix,
                            kind=exc.kind) from None
