"""Cache keys (Merkle signatures over a node's ancestors) and the byte-bounded LRU store.

A node is dirty exactly when its key is absent from the store; nothing else marks dirtiness.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

DEFAULT_CACHE_BYTES = 8 * 1024 ** 3


def _canonical(value: Any) -> str | None:
    """Canonical JSON of a constant input, or None when it cannot be fingerprinted."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None


def node_key(class_type: str, version: int, constants: dict, links: dict, fingerprint: str | None,
             *, volatile: bool = False) -> str:
    """The signature of one node: class, version, constant inputs, upstream keys and slots, file
    fingerprints. Anything that cannot be fingerprinted (and ``volatile``) gives a key that never
    matches, never a stale hit."""
    if volatile:
        return "volatile:" + uuid.uuid4().hex
    parts = [class_type, str(version)]
    for name in sorted(constants):
        text = _canonical(constants[name])
        if text is None:
            return "unhashable:" + uuid.uuid4().hex
        parts.append(f"{name}={text}")
    for name in sorted(links):
        upstream_key, slot = links[name]
        parts.append(f"{name}<-{upstream_key}#{slot}")
    if fingerprint is not None:
        parts.append("files:" + fingerprint)
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def estimate_nbytes(value: Any) -> int:
    """Rough bytes held by a value: tensors, modules, images, arrays and containers of them.

    Duck-typed so this module never imports torch. Objects may report their own size with a
    ``__loraloom_nbytes__()`` method. Iterative (no recursion) and counts each object once.
    """
    total = 0
    seen: set[int] = set()
    stack = [value]
    while stack:
        obj = stack.pop()
        if obj is None or isinstance(obj, (bool, int, float)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        own = getattr(obj, "__loraloom_nbytes__", None)
        if callable(own) and not isinstance(obj, type):
            total += int(own())
        elif callable(getattr(obj, "element_size", None)) and callable(getattr(obj, "nelement", None)):
            total += int(obj.element_size()) * int(obj.nelement())
        elif callable(getattr(obj, "parameters", None)) and callable(getattr(obj, "buffers", None)):
            stack.extend(obj.parameters())
            stack.extend(obj.buffers())
        elif isinstance(getattr(obj, "nbytes", None), int):
            total += obj.nbytes
        elif callable(getattr(obj, "getbands", None)) and isinstance(getattr(obj, "size", None), tuple):
            w, h = obj.size
            total += w * h * len(obj.getbands())
        elif isinstance(obj, (str, bytes, bytearray)):
            total += len(obj)
        elif isinstance(obj, dict):
            total += sys.getsizeof(obj)
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            total += sys.getsizeof(obj)
            stack.extend(obj)
        elif is_dataclass(obj) and not isinstance(obj, type):
            total += sys.getsizeof(obj)
            stack.extend(getattr(obj, f.name) for f in fields(obj))
        else:
            total += sys.getsizeof(obj)
    return total


@dataclass
class Entry:
    """A cached node result: its output values, its UI output, and the bytes they hold."""

    outputs: tuple
    ui: dict | None
    nbytes: int


class CacheStore:
    """Byte-bounded LRU map from cache key to :class:`Entry`. Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if not (isinstance(max_bytes, int) and max_bytes >= 0) and not math.isinf(max_bytes):
            raise ValueError(f"cache budget {max_bytes!r} must be a non-negative number of bytes")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> Entry | None:
        """The entry for ``key`` (and mark it recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, outputs: tuple, ui: dict | None) -> bool:
        """Store a result, evicting least recently used entries to stay within the byte budget.
        A result larger than the whole budget is not stored; returns whether it was."""
        nbytes = estimate_nbytes(outputs) + estimate_nbytes(ui)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if nbytes > self.max_bytes:
                return False
            self._entries[key] = Entry(outputs, ui, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
