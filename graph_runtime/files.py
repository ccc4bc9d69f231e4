"""Opening files from strangers: regular files only, reads bounded, changes while reading detected.

Every file LoRA Loom reads by name (LoRAs, workflows, PNGs, the files a cache key fingerprints)
is opened here. A FIFO blocks ``open()`` until a writer comes, and a device such as ``/dev/zero``
never ends, so a path is ``stat``-ed before it is opened and only a regular file is opened; the
open itself is non-blocking and followed by ``fstat``, so a FIFO swapped in between is refused too.

:class:`FileState` is what ``stat`` says about a file's content: size, mtime, ctime, inode and
device. ``cp -p``, rsync and ``touch`` can set mtime back, but not ctime (the kernel sets it on every
change), and a file replaced by a rename has another inode; so two equal states mean unchanged
content, with the limits README's "Changed files" states (a same-size write in the same
timestamp tick as the previous change, and filesystems without a real ctime).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

from .errors import LoomError


class FileError(LoomError, ValueError):
    """A file cannot be read as asked: not a regular file, unreadable, too large, or changing while
    read. ``kind`` is ``"not_regular"``, ``"unreadable"``, ``"too_large"`` or ``"changed_while_reading"``."""


class FileState(NamedTuple):
    """What ``stat`` says about a file's content; equal states mean the content did not change."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileState":
        """The state in a ``stat`` result."""
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _not_regular(path: Path, mode: int, what: str) -> FileError:
    return FileError(f"this is {_kind_of(mode)}, not a regular file; a {what} must be a regular file, so it "
                     "is not opened (a pipe or device would block or never end).", file=path,
                     value=_kind_of(mode), kind="not_regular")


def _unreadable(path: Path, exc: OSError, what: str) -> FileError:
    return FileError(f"cannot read this {what}: {exc.strerror or exc}.", file=path, value=exc.strerror,
                     fix="check that the file exists and that this user may read it.", kind="unreadable")


def changed_while_reading(path: str | os.PathLike, what: str = "file") -> FileError:
    """The error for a file whose state changed between opening it and finishing the read."""
    return FileError(f"this {what} changed while it was being read (another program is writing or "
                     "replacing it), so what was read may be a mix of old and new.", file=path,
                     fix="wait until the download or copy has finished, then run again.",
                     kind="changed_while_reading")


def too_large(path: str | os.PathLike, size: int, limit: int, what: str = "file", fix: str | None = None) -> FileError:
    """The error for a file above its size limit (checked before a byte is read)."""
    return FileError(f"this {what} is too large: {size} bytes is above the limit of {limit} bytes.", file=path, value=size,
                     limit=limit, fix=fix, kind="too_large")


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[BinaryIO, FileState]]:
    """Open a regular file for reading (unbuffered) and yield it with its state. Anything else
    (FIFO, device, socket, folder) is refused before it is opened; OS errors become :class:`FileError`."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode, what)
        # O_NONBLOCK: should a FIFO be swapped in after the stat, open() returns at once and fstat
        # refuses it; on a regular file the flag changes nothing.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _unreadable(path, exc, what) from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode, what)
        yield f, FileState.of(st)


def state_of(f: BinaryIO) -> FileState:
    """The current state of an open file."""
    return FileState.of(os.fstat(f.fileno()))


def path_state(path: str | os.PathLike) -> FileState | None:
    """The current state of the file at ``path`` (following symlinks), or None when it is gone."""
    try:
        return FileState.of(os.stat(path))
    except OSError:
        return None


def read_capped(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes, read in one consistent state."""
    with open_regular(path, what) as (f, state):
        if state.size > max_bytes:
            raise too_large(path, state.size, max_bytes, what)
        data = read_upto(f, state.size + 1)
        if len(data) != state.size or state_of(f) != state:
            raise changed_while_reading(path, what)
        return data


def read_upto(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes from ``f``: fewer only at the end of the file (raw reads may return less)."""
    parts, left = [], n
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
