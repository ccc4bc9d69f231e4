"""The persistent result cache: results of expensive pure nodes kept on disk across processes.

A node opts in by declaring a codec (``@node(..., persist=codec)``): an object that writes its
outputs to one file and reads them back with every check a file from disk deserves (see
:class:`Codec`). The store deals in files only; it never sees a tensor.

- **Keys** (:func:`entry_key`): the node's in-memory key (the Merkle signature over class, version,
  constants, file contents and ancestors, see :mod:`.cache`) joined with the codec's name and its
  code version, so a changed implementation never reads an old entry.
- **Integrity**: an entry is written under a temp name in ``tmp/``, hashed as it is written, and
  renamed to ``<key[:2]>/<key>.<digest><suffix>``: it appears whole or not at all, and two processes
  writing the same entry at once each rename a whole file. It is not fsynced: after a power loss an
  entry may be missing or hold other bytes than its name says, and the read below catches that. On a read the codec reports the digest of the bytes it
  read and the key stamped inside the file; an entry whose digest or key differs from its name, or
  that the codec refuses (truncated, garbled), is deleted and recomputed, never used.
- **Eviction**: least recently used first, by the file's mtime, which a hit sets (``utime``: the
  entry itself is not rewritten), down to a byte budget after each write.
- **Location**: ``Runtime(disk_cache_dir=...)`` / ``--disk-cache-dir``, else ``LORALOOM_DISK_CACHE_DIR``,
  else ``$XDG_CACHE_HOME/loraloom/results``, else ``~/.cache/loraloom/results``; the budget likewise
  (``disk_cache_bytes``, ``--disk-cache-bytes``, ``LORALOOM_DISK_CACHE_BYTES``); a budget of 0 turns
  the store off: nothing is read or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

from .cache import file_hasher
from .errors import InputError
from .paths import user_cache_root

ENV_DISK_CACHE_DIR = "LORALOOM_DISK_CACHE_DIR"
ENV_DISK_CACHE_BYTES = "LORALOOM_DISK_CACHE_BYTES"
DEFAULT_DISK_CACHE_BYTES = 4 * 1024 ** 3
"""Room for about ten SDXL merges at rank 32 in float32 (~400 MB each)."""

TMP = "tmp"
# A temp file this old belongs to a writer that was killed: no entry takes an hour to write.
STALE_TMP_S = 3600
_KEY = re.compile(r"^[0-9a-f]{64}$")
_ENTRY = re.compile(r"^(?P<key>[0-9a-f]{64})\.(?P<digest>[0-9a-f]{64})\.")

Note = Callable[[str], None]


def _missing():
    """Ignore a file or folder that vanished meanwhile (another process evicted or cleared it)."""
    return contextlib.suppress(FileNotFoundError, NotADirectoryError)


class Codec(Protocol):
    """How a node's outputs live in one file. ``name`` and ``version()`` join the entry's key: the
    version must change whenever the code that computes the outputs or the file layout changes."""

    name: str
    suffix: str

    def version(self) -> str:
        """The code version of the results this codec stores."""

    def accepts(self, outputs: tuple, ui: dict | None) -> bool:
        """Whether these outputs can be stored (values it cannot write exactly never persist)."""

    def save(self, outputs: tuple, ui: dict | None, f: BinaryIO, stamp: dict[str, str]) -> None:
        """Write ``outputs``, ``ui`` and the ``stamp`` strings into the binary file ``f``."""

    def load(self, path: Path) -> tuple[tuple, dict | None, dict[str, str], str]:
        """``(outputs, ui, stamp, digest)`` read from ``path``, ``digest`` being the ``file_hasher``
        digest of the bytes read; raises on anything it would not trust."""


def entry_key(key: str, codec: Codec) -> str | None:
    """The disk key of a node whose in-memory key is ``key``; None for a key that never matches
    (volatile or unhashable nodes: see :func:`.cache.node_key`)."""
    if not _KEY.match(key):
        return None
    return hashlib.sha256(f"{key}\x1f{codec.name}\x1f{codec.version()}".encode()).hexdigest()


def default_dir(env=None) -> Path:
    """``LORALOOM_DISK_CACHE_DIR``, else ``$XDG_CACHE_HOME/loraloom/results``, else
    ``~/.cache/loraloom/results``."""
    env = os.environ if env is None else env
    if env.get(ENV_DISK_CACHE_DIR):
        return Path(env[ENV_DISK_CACHE_DIR]).expanduser()
    return user_cache_root(env) / "results"


def _budget(value: Any, source: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value.replace("_", ""))
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"disk cache budget {value!r} (from {source}) must be a whole number of bytes, 0 or more.",
                         key=source, value=value, limit=0, kind="bad_cache_budget",
                         fix=f"give 0 (no disk cache) or more bytes; the default is {DEFAULT_DISK_CACHE_BYTES}")
    return value


@dataclass(frozen=True)
class DiskCacheInfo:
    """What ``loraloom cache info`` shows: the folder, its entries and bytes, and the budget."""

    root: Path
    entries: int
    nbytes: int
    max_bytes: int


class DiskCache:
    """Entries on disk under ``root``, at most ``max_bytes`` in all (0: off). Safe to share between
    processes and threads: every change is one rename or one unlink."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_DISK_CACHE_BYTES):
        self.root = Path(root).expanduser().absolute()
        self.max_bytes = _budget(max_bytes, "disk_cache_bytes")

    @classmethod
    def configure(cls, root: str | os.PathLike | None = None, max_bytes: int | None = None, env=None) -> "DiskCache":
        """Arguments first (None: not given), then ``LORALOOM_DISK_CACHE_DIR`` and
        ``LORALOOM_DISK_CACHE_BYTES``, then the defaults."""
        env = os.environ if env is None else env
        if max_bytes is None:
            max_bytes = _budget(env[ENV_DISK_CACHE_BYTES], ENV_DISK_CACHE_BYTES) if env.get(ENV_DISK_CACHE_BYTES) \
                else DEFAULT_DISK_CACHE_BYTES
        return cls(root if root is not None else default_dir(env), max_bytes)

    @property
    def enabled(self) -> bool:
        """False with a budget of 0: nothing is read or written."""
        return self.max_bytes > 0

    # ------------------------------------------------------------------------------------ entries

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        """Every entry with its stat; what another process removes meanwhile is left out."""
        found = []
        with _missing():
            shards = [s.path for s in os.scandir(self.root) if s.name != TMP and s.is_dir(follow_symlinks=False)]
            for shard in shards:
                with _missing():
                    for entry in os.scandir(shard):
                        if _ENTRY.match(entry.name) and entry.is_file(follow_symlinks=False):
                            with _missing():
                                found.append((Path(entry.path), entry.stat(follow_symlinks=False)))
        return found

    def _candidates(self, key: str) -> list[Path]:
        """The entries stored under ``key``, most recently used first (two processes whose results
        differed in their bytes each leave one; both are whole)."""
        shard = self.root / key[:2]
        try:
            names = [e for e in os.scandir(shard) if e.name.startswith(key + ".") and _ENTRY.match(e.name)]
        except OSError:  # none yet, or a folder this user cannot read: a miss, never a failed run
            return []
        stamped = []
        for e in names:
            try:
                stamped.append((e.stat(follow_symlinks=False).st_mtime_ns, Path(e.path)))
            except FileNotFoundError:
                continue
        return [p for _, p in sorted(stamped, reverse=True)]

    def get(self, key: str, codec: Codec, note: Note = lambda text: None) -> tuple[tuple, dict | None] | None:
        """The outputs and UI output stored under ``key`` (a disk key, :func:`entry_key`), or None.
        An entry that fails any check is deleted and ``note`` says why; the caller recomputes."""
        if not self.enabled:
            return None
        for path in self._candidates(key):
            expected = _ENTRY.match(path.name)["digest"]
            try:
                outputs, ui, stamp, digest = codec.load(path)
            except FileNotFoundError:
                continue  # evicted since it was listed
            except Exception as exc:  # noqa: BLE001 - whatever makes a file unreadable makes it no entry
                self._discard(path, f"{type(exc).__name__}: {exc}", note)
                continue
            if digest != expected:
                self._discard(path, f"its content digest {digest} is not {expected} (the file changed on disk)", note)
            elif stamp.get("key") != key:
                self._discard(path, f"it was stored under key {stamp.get('key')!r}", note)
            else:
                try:
                    os.utime(path)  # last use, for eviction: the entry itself is not rewritten
                except OSError:
                    pass  # read-only or another user's cache: still a valid hit
                return outputs, ui
        return None

    def _discard(self, path: Path, why: str, note: Note) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            why += f"; it could not be deleted ({exc})"
        note(f"disk cache entry {path.name} discarded, to be recomputed: {why}")

    def put(self, key: str, codec: Codec, outputs: tuple, ui: dict | None, note: Note = lambda text: None) -> Path | None:
        """Store a result under ``key`` (a disk key), then evict the least recently used entries
        beyond the budget. Returns the entry's path, or None when nothing was stored (off, a value
        the codec cannot write, larger than the whole budget, or a write that failed: ``note`` says)."""
        if not self.enabled or not codec.accepts(outputs, ui):
            return None
        tmp_dir = self.root / TMP
        tmp = None
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=f"{key[:16]}.{os.getpid()}.", suffix=codec.suffix)
            tmp = Path(name)
            with os.fdopen(fd, "wb") as f:
                out = _HashingWriter(f)
                codec.save(outputs, ui, out, {"key": key})
            size, digest = out.size, out.hasher.hexdigest()
            if size > self.max_bytes:
                note(f"a result of {size} bytes is larger than the disk cache's budget ({self.max_bytes} bytes): "
                     "not stored (raise it with --disk-cache-bytes or LORALOOM_DISK_CACHE_BYTES)")
                return None
            final = self.root / key[:2] / f"{key}.{digest}{codec.suffix}"
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            tmp = None
            self.evict(keep=final)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot write must not fail the run
            note(f"the result could not be stored in the disk cache {self.root}: {type(exc).__name__}: {exc}")
            return None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        return final

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until the rest fit the budget (never ``keep``), and
        temp files that killed writers left; returns the number of entries deleted."""
        entries = sorted(self._entries(), key=lambda e: e[1].st_mtime_ns)
        total = sum(st.st_size for _, st in entries)
        deleted = 0
        for path, st in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            try:
                path.unlink()
                deleted += 1
            except FileNotFoundError:
                pass  # another process evicted it first
            except OSError:
                continue
            total -= st.st_size
        now = time.time()
        with _missing():
            for entry in os.scandir(self.root / TMP):
                with _missing():
                    if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_S:
                        os.unlink(entry.path)
        return deleted

    def info(self) -> DiskCacheInfo:
        """The folder, the number of entries and their bytes, and the budget."""
        entries = self._entries()
        return DiskCacheInfo(self.root, len(entries), sum(st.st_size for _, st in entries), self.max_bytes)

    def clear(self) -> DiskCacheInfo:
        """Delete every entry (and temp file); returns what was there. Only names this store writes are
        touched: a folder given by mistake loses nothing else."""
        before = self.info()
        for path, _ in self._entries():
            path.unlink(missing_ok=True)
        if self.root.is_dir():
            for shard in os.scandir(self.root):
                if shard.name == TMP and shard.is_dir(follow_symlinks=False):
                    shutil.rmtree(shard.path, ignore_errors=True)
                elif re.fullmatch(r"[0-9a-f]{2}", shard.name) and shard.is_dir(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(shard.path)  # only when empty
        return before


class _HashingWriter:
    """A binary file that hashes (``file_hasher``) and counts what is written through it: the entry's
    digest without reading it back."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.hasher = file_hasher()
        self.size = 0

    def write(self, data) -> int:
        self.hasher.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)


__all__ = ["DEFAULT_DISK_CACHE_BYTES", "ENV_DISK_CACHE_BYTES", "ENV_DISK_CACHE_DIR", "Codec", "DiskCache",
           "DiskCacheInfo", "default_dir", "entry_key"]
