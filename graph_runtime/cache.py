"""Cache policy in one place: keys, file fingerprints, size estimates and the byte-bounded store.

- **Keys** (:func:`node_key`): a Merkle signature over a node's class, version, constant inputs,
  file fingerprints and its ancestors' keys. A node is dirty exactly when its key is absent from
  the store; nothing else marks dirtiness. Whatever cannot be hashed gives a key that never
  matches (and warns once per class and input), never a stale hit.
- **File fingerprints** (:func:`file_fingerprint`): the hashing contract for file content, defined
  here once (:func:`file_hasher`, :data:`HASH_CHUNK_BYTES`) and memoised on the file's real path and
  state (size, mtime, ctime, inode: see :mod:`.files`). LoRA readers that hash while they read use the
  same contract, so a LoRA value's fingerprint and its file input's fingerprint agree. In a strict
  run (:func:`strict_fingerprints`) nothing remembered is trusted: content is hashed every run.
- **Sizes** (:func:`footprint`, :func:`estimate_nbytes`): the allocations a value holds, each named
  by an identity, so memory shared by several values (one LoRA's tensors held by a LoadLoRA output
  and by every recipe built on it) is counted once.
- **Eviction** (:class:`CacheStore`): an LRU bounded in bytes, which counts each allocation once
  across all entries and frees it from the total when the last entry holding it goes.

Duck-typed throughout: this module never imports torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Hashable, Iterable

from .errors import InputError
from .files import FileState, changed_while_reading, open_regular, path_state, state_of

DEFAULT_CACHE_BYTES = 8 * 1024 ** 3

# ------------------------------------------------------------------------------------------ keys

_warned_unhashable: set[tuple[str, str]] = set()
_warn_lock = threading.Lock()


def _canonical(value: Any) -> str | None:
    """Canonical JSON of a constant input, or None when it cannot be fingerprinted."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None


def _warn_unhashable(class_type: str, name: str, value: Any, node_id: str | None) -> None:
    """Warn once per (class, input) that a constant keeps its node from ever hitting the cache."""
    with _warn_lock:
        if (class_type, name) in _warned_unhashable:
            return
        _warned_unhashable.add((class_type, name))
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    where = f"node {node_id} ({class_type})" if node_id is not None else class_type
    warnings.warn(f"{where} input {name!r}: the constant {text} ({type(value).__name__}) cannot be hashed "
                  "for the cache key (it is not plain JSON), so this node re-runs on every run. "
                  "Fix: pass a str, number, bool, list or dict.", RuntimeWarning, stacklevel=3)


def node_key(class_type: str, version: int, constants: dict, links: dict, fingerprint: str | None,
             *, volatile: bool = False, node_id: str | None = None) -> str:
    """The signature of one node: class, version, constant inputs, upstream keys and slots, file
    fingerprints. Anything that cannot be fingerprinted (and ``volatile``) gives a key that never
    matches, never a stale hit; an unhashable constant also warns, once per class and input."""
    if volatile:
        return "volatile:" + uuid.uuid4().hex
    parts = [class_type, str(version)]
    for name in sorted(constants):
        text = _canonical(constants[name])
        if text is None:
            _warn_unhashable(class_type, name, constants[name], node_id)
            return "unhashable:" + uuid.uuid4().hex
        parts.append(f"{name}={text}")
    for name in sorted(links):
        upstream_key, slot = links[name]
        parts.append(f"{name}<-{upstream_key}#{slot}")
    if fingerprint is not None:
        parts.append("files:" + fingerprint)
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------- file fingerprints

HASH_CHUNK_BYTES = 8 * 2**20
"""Read (and hash) files in slices this big: few syscalls, yet small enough to stay in the CPU's cache
between the read and the hash. The digest does not depend on it."""

HASH_TRIES = 3
"""A file that changes while it is hashed is hashed again, at most this many times in all."""

RACY_NS = 2 * 10**9
"""A digest is remembered only for a file whose last change (ctime) is at least this old when hashing
starts: a same-size write in the same timestamp tick as that change would leave its state unchanged
(git's "racy clean" rule; filesystem ticks are 1-10 ms, FAT's mtime 2 s)."""

# (real path, FileState) -> digest: a file's state vouches for its content (see .files).
_fingerprints: dict[tuple[str, FileState], str] = {}
_fingerprint_lock = threading.Lock()
# Inside a strict run: the digests hashed during that run, the only ones it trusts.
_run_digests: contextvars.ContextVar[dict | None] = contextvars.ContextVar("loraloom_run_digests", default=None)
# Inside watch_files(): real path -> (state, digest) of every file fingerprinted.
_watched: contextvars.ContextVar[dict | None] = contextvars.ContextVar("loraloom_watched", default=None)
# Inside pinned_fingerprints(): real path -> digest to use instead of the file's.
_pins: contextvars.ContextVar[dict | None] = contextvars.ContextVar("loraloom_pins", default=None)


def file_hasher():
    """A fresh hasher for file content: the one contract for every file fingerprint (SHA-256; its
    ``hexdigest()`` is the fingerprint, what ``sha256sum`` prints). SHA-256 rather than blake2b:
    on CPUs with SHA instructions (x86 since 2017-2019, ARMv8 with its crypto extension) hashlib's
    OpenSSL SHA-256 runs 1.7 GiB/s against blake2b's 0.6 GiB/s, and the fingerprint is most of
    what reading a LoRA or a base costs."""
    return hashlib.sha256()


@dataclass(frozen=True)
class KnownFingerprint:
    """A remembered digest and the file state it was computed in: a reader that opens the file and
    finds it in ``state`` may report ``digest`` without hashing again."""

    digest: str
    state: FileState


def _hash_open_file(f, state: FileState) -> str | None:
    """The digest of an open file's ``state.size`` bytes, or None if it changed meanwhile."""
    h = file_hasher()
    left = state.size
    while left > 0:
        chunk = f.read(min(left, HASH_CHUNK_BYTES))
        if not chunk:
            return None
        h.update(chunk)
        left -= len(chunk)
    if f.read(1) or state_of(f) != state:
        return None
    return h.hexdigest()


def _lookup(real: str, state: FileState) -> str | None:
    run = _run_digests.get()
    if run is not None:
        return run.get((real, state))
    with _fingerprint_lock:
        return _fingerprints.get((real, state))


def _remember(real: str, state: FileState, digest: str, started_ns: int) -> None:
    run = _run_digests.get()
    if run is not None:
        run[(real, state)] = digest
    if started_ns - state.ctime_ns >= RACY_NS:
        with _fingerprint_lock:
            _fingerprints[(real, state)] = digest


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(path)  # unlike Path.resolve, never raises (a symlink loop stays as it is)


def remember_fingerprint(path: str | os.PathLike, digest: str, state: FileState, started_ns: int) -> None:
    """Remember ``digest`` as the fingerprint of the file at ``path`` in ``state``: for a reader that
    hashed the whole file (``file_hasher``) on a read of its own that began at ``started_ns``
    (``time.time_ns()``) and saw the state unchanged from opening to end, so the next
    ``file_fingerprint`` need not read it again. The same rules as for digests hashed here apply
    (strict runs, the RACY_NS age)."""
    _remember(_real(path), state, digest, started_ns)


def known_fingerprint(path: str | os.PathLike) -> KnownFingerprint | None:
    """The remembered digest of a file in its current state, with that state; None if there is none
    (in a strict run: none that this run hashed)."""
    state = path_state(path)
    if state is None:
        return None
    digest = _lookup(_real(path), state)
    return None if digest is None else KnownFingerprint(digest, state)


def file_fingerprint(path: str | os.PathLike) -> str:
    """The hex digest of the file's bytes (for a folder: of every regular file's relative path and
    digest); recomputed only when a file's state (size, mtime, ctime, inode) changes. Only regular
    files are opened; a file that keeps changing while it is hashed is refused (:class:`FileError`)."""
    path = Path(path)
    if path.is_dir():
        h = file_hasher()
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                if not full.is_file():  # FIFOs, devices, sockets, dangling links: never content
                    continue
                h.update(full.relative_to(path).as_posix().encode() + b"\0")
                h.update(file_fingerprint(full).encode())
        return h.hexdigest()
    real = _real(path)
    pins = _pins.get()
    if pins is not None and real in pins:
        return pins[real]
    for _ in range(HASH_TRIES):
        with open_regular(path) as (f, state):
            digest = _lookup(real, state)
            if digest is None:
                started = time.time_ns()
                digest = _hash_open_file(f, state)
                if digest is None:
                    continue
                _remember(real, state, digest, started)
        watched = _watched.get()
        if watched is not None:
            watched[real] = (state, digest)
        return digest
    raise changed_while_reading(path)


@contextlib.contextmanager
def strict_fingerprints():
    """Within this block, no digest remembered before it is trusted: each file is hashed (once)."""
    token = _run_digests.set({})
    try:
        yield
    finally:
        _run_digests.reset(token)


@contextlib.contextmanager
def watch_files():
    """Collect ``{real path: (state, digest)}`` of every file fingerprinted within this block."""
    watched: dict[str, tuple[FileState, str]] = {}
    token = _watched.set(watched)
    try:
        yield watched
    finally:
        _watched.reset(token)


@contextlib.contextmanager
def pinned_fingerprints(pins: dict[str, str]):
    """Within this block, the files named (by real path) fingerprint as given, without being read."""
    token = _pins.set(pins)
    try:
        yield
    finally:
        _pins.reset(token)


# ----------------------------------------------------------------------------------------- sizes

PARTS_METHOD = "__loraloom_parts__"
"""A value type may define ``__loraloom_parts__(self)`` returning the objects it holds that take
memory (tensors, or other values). Defining it promises the value is immutable: its answer is
memoised for the value's lifetime, so a long chain of values built from one another is sized once
per value, not once per value per step."""


class Footprint:
    """The allocations one value holds: ``storages`` maps an allocation's identity to its bytes, and
    ``parts`` are the footprints of the immutable values it holds (shared ones appear in several
    footprints and are counted once by :meth:`allocations`)."""

    __slots__ = ("storages", "parts", "__weakref__")

    def __init__(self, storages: dict[Hashable, int], parts: tuple["Footprint", ...] = ()):
        self.storages = storages
        self.parts = parts

    def allocations(self) -> dict[Hashable, int]:
        """Every distinct allocation reachable from this footprint: identity -> bytes."""
        out: dict[Hashable, int] = {}
        seen: set[int] = set()
        stack = [self]
        while stack:
            fp = stack.pop()
            if id(fp) in seen:
                continue
            seen.add(id(fp))
            out.update(fp.storages)
            stack.extend(fp.parts)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct allocations."""
        return sum(self.allocations().values())


class SizeStats:
    """How much sizing work has been done (for tests and benchmarks that count work, not time):
    ``values`` footprints computed for immutable values (memo misses), ``tensors`` tensor storages
    resolved."""

    def __init__(self):
        self.values = 0
        self.tensors = 0


size_stats = SizeStats()
# id(value) -> (weak reference to it, its footprint). No lock: single dict operations are atomic, and a
# weakref callback runs while its object is being freed, before its id can be reused.
_memo: dict[int, tuple[weakref.ref, Footprint]] = {}


def _forget(obj_id: int, ref: weakref.ref) -> None:
    held = _memo.get(obj_id)
    if held is not None and held[0] is ref:
        _memo.pop(obj_id, None)


def _tensor_storage(obj: Any) -> tuple[Hashable, int] | None:
    """(identity, bytes) of a torch tensor's storage: views and aliases of one allocation share it.
    A live storage's data pointer is unique on its device, and the entry holding the tensor keeps it
    alive, so (device, pointer) names it. None when the tensor has no plain storage (sparse, ...)."""
    try:
        storage = obj.untyped_storage()
        ptr, nbytes = int(storage.data_ptr()), int(storage.nbytes())
        device = str(obj.device)
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return None
    size_stats.tensors += 1
    if device == "meta" or ptr == 0:  # holds no memory (meta tensors, empty storages)
        return ("storage", device, id(storage)), 0
    return ("storage", device, ptr), nbytes


def _leaf(obj: Any) -> tuple[Hashable, int] | None:
    """(identity, bytes) of an object whose memory is its own, or None for a container to walk."""
    if callable(getattr(obj, "untyped_storage", None)):
        found = _tensor_storage(obj)
        if found is not None:
            return found
    if callable(getattr(obj, "element_size", None)) and callable(getattr(obj, "nelement", None)):
        return ("object", id(obj)), int(obj.element_size()) * int(obj.nelement())
    if isinstance(getattr(obj, "nbytes", None), int):  # numpy arrays and the like
        return ("object", id(obj)), obj.nbytes
    if callable(getattr(obj, "getbands", None)) and isinstance(getattr(obj, "size", None), tuple):  # PIL
        w, h = obj.size
        return ("object", id(obj)), w * h * len(obj.getbands())
    if isinstance(obj, (str, bytes, bytearray)):
        return ("object", id(obj)), len(obj)
    return None


def _walk(roots: Iterable[Any]) -> Footprint:
    """The footprint of the objects in ``roots`` (not of the iterable itself). Iterative; objects
    met twice count once; immutable values (with ``__loraloom_parts__``) are sized once ever."""
    storages: dict[Hashable, int] = {}
    parts: list[Footprint] = []
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if obj is None or isinstance(obj, (bool, int, float)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if callable(getattr(obj, PARTS_METHOD, None)) and not isinstance(obj, type):
            parts.append(_value_footprint(obj))
            continue
        leaf = _leaf(obj)
        if leaf is not None:
            storages[leaf[0]] = leaf[1]
        elif callable(getattr(obj, "parameters", None)) and callable(getattr(obj, "buffers", None)):
            stack.extend(obj.parameters())  # torch modules: their weights, not the Python objects
            stack.extend(obj.buffers())
        else:
            storages[("object", id(obj))] = sys.getsizeof(obj)
            if isinstance(obj, dict):
                stack.extend(obj.keys())
                stack.extend(obj.values())
            elif isinstance(obj, (list, tuple, set, frozenset)):
                stack.extend(obj)
            elif is_dataclass(obj) and not isinstance(obj, type):
                stack.extend(getattr(obj, f.name) for f in fields(obj))
    return Footprint(storages, tuple(parts))


def _value_footprint(obj: Any) -> Footprint:
    """The memoised footprint of an immutable value (one with ``__loraloom_parts__``)."""
    held = _memo.get(id(obj))
    if held is not None and held[0]() is obj:
        return held[1]
    size_stats.values += 1
    fp = _walk(getattr(obj, PARTS_METHOD)())
    try:
        ref = weakref.ref(obj, lambda r, i=id(obj): _forget(i, r))
    except TypeError:  # not weak-referenceable: sized again each time, still correct
        return fp
    _memo[id(obj)] = (ref, fp)
    return fp


def footprint(value: Any) -> Footprint:
    """The allocations a value holds: tensors (by storage, so views and shared tensors count once),
    torch modules (their parameters and buffers), images, arrays, strings and containers of them.
    Objects may name what they hold with ``__loraloom_parts__()`` (see :data:`PARTS_METHOD`)."""
    return _walk((value,))


def estimate_nbytes(value: Any) -> int:
    """Bytes held by a value, each allocation counted once (see :func:`footprint`)."""
    return footprint(value).nbytes


# ------------------------------------------------------------------------------------- the store


@dataclass
class Entry:
    """A cached node result: its output values, its UI output, the bytes they hold on their own, and
    the identities of the allocations they hold (shared with other entries or not)."""

    outputs: tuple
    ui: dict | None
    nbytes: int
    allocations: tuple = ()


class CacheStore:
    """Byte-bounded LRU map from cache key to :class:`Entry`. Thread-safe.

    The byte total counts each allocation once, however many entries hold it (a LoRA's tensors held by
    LoadLoRA, WeightedBlend and Fuse outputs), and drops it when the last entry holding it is evicted.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        whole = isinstance(max_bytes, int) and not isinstance(max_bytes, bool) and max_bytes >= 0
        if not (whole or max_bytes == math.inf):  # inf: no bound
            raise InputError(f"cache budget {max_bytes!r} must be a non-negative number of bytes.", key="cache_bytes",
                             value=max_bytes, limit=0, kind="bad_cache_budget",
                             fix=f"give 0 (cache nothing) or more bytes; the default is {DEFAULT_CACHE_BYTES}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._refs: dict[Hashable, list[int]] = {}  # identity -> [entries holding it, bytes]
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
        """Bytes held by all entries, each allocation counted once."""
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
        A result larger than the whole budget on its own is not stored; returns whether it was."""
        allocations = _walk((outputs, ui)).allocations()
        nbytes = sum(allocations.values())
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._release(old)
            if nbytes > self.max_bytes:
                return False
            entry = Entry(outputs, ui, nbytes, tuple(allocations))
            for identity, size in allocations.items():
                held = self._refs.get(identity)
                if held is None:
                    self._refs[identity] = [1, size]
                    self._bytes += size
                else:
                    held[0] += 1
            self._entries[key] = entry
            # The new entry alone fits, so this stops before reaching it.
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._release(evicted)
                self.evictions += 1
            return True

    def _release(self, entry: Entry) -> None:
        for identity in entry.allocations:
            held = self._refs[identity]
            held[0] -= 1
            if held[0] == 0:
                del self._refs[identity]
                self._bytes -= held[1]

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._refs.clear()
            self._bytes = 0
