"""Strict JSON for workflows from strangers: no NaN/Infinity, no duplicate keys, bounded size and depth."""

from __future__ import annotations

import json
import math
import os

from .errors import WorkflowError
from .files import FileError, read_capped

MAX_WORKFLOW_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
MAX_INT_DIGITS = 4300  # Python's own limit for int(str): longer ones raise a bare ValueError


def _reject_constant(name: str):
    raise WorkflowError(f"{name} is not a finite number; JSON workflows may hold only finite numbers",
                        value=name, kind="not_finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WorkflowError(f"number {text} is not finite (it overflows a 64-bit float); "
                            "workflows may hold only finite numbers", value=text, kind="overflow")
    return value


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


def loads_strict(text: str | bytes, source: str = "workflow", max_bytes: int = MAX_WORKFLOW_BYTES):
    """Parse JSON text, rejecting non-finite numbers, duplicate keys and absurd size or nesting."""
    size = len(text)
    if size > max_bytes:
        raise WorkflowError(f"{source}: {size} bytes is above the limit of {max_bytes} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WorkflowError(f"{source}: not UTF-8 text (byte {exc.start}); is this a JSON file?") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           parse_int=_bounded_int, object_pairs_hook=_unique_pairs)
    except WorkflowError as exc:
        raise exc.at(file=source) from None
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise WorkflowError(f"{source}: nesting is deeper than the limit {MAX_DEPTH}") from None
    check_depth(value, source=source)
    return value


def load_json_file(path: str | os.PathLike, max_bytes: int = MAX_WORKFLOW_BYTES):
    """Read and strictly parse a JSON file: a regular file only, its size checked before reading."""
    return loads_strict(read_workflow_bytes(path, max_bytes), source=str(path), max_bytes=max_bytes)


def read_workflow_bytes(path: str | os.PathLike, max_bytes: int = MAX_WORKFLOW_BYTES) -> bytes:
    """The bytes of a workflow file (a regular file of at most ``max_bytes``); every problem is a
    WorkflowError naming the file."""
    try:
        return read_capped(path, max_bytes, "workflow")
    except FileError as exc:
        raise WorkflowError(exc.message, file=path, value=exc.value, limit=exc.limit, fix=exc.fix,
                            kind=exc.kind) from None
