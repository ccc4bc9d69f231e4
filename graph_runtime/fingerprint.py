"""Content fingerprints of files and folders, memoised on (path, size, mtime_ns)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_CHUNK = 1 << 20
_memo: dict[tuple, str] = {}
_lock = threading.Lock()


def _file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def known_fingerprint(path: str | os.PathLike) -> str | None:
    """The memoised fingerprint of a file that has not changed since it was hashed, else None."""
    key = _key(Path(path))
    with _lock:
        return _memo.get(key)


def remember_fingerprint(path: str | os.PathLike, digest: str) -> None:
    """Record a file's fingerprint computed elsewhere (a reader that hashed while reading)."""
    key = _key(Path(path))
    with _lock:
        _memo[key] = digest


def file_fingerprint(path: str | os.PathLike) -> str:
    """blake2b of the file's bytes (of every file, for a folder); recomputed only when a file's
    size or mtime changes."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.blake2b(digest_size=16)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                h.update(full.relative_to(path).as_posix().encode() + b"\0")
                h.update(file_fingerprint(full).encode())
        return h.hexdigest()
    key = _key(path)
    with _lock:
        hit = _memo.get(key)
    if hit is None:
        hit = _file_hash(path)
        with _lock:
            _memo[key] = hit
    return hit
