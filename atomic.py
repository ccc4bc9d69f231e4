"""Whole files or nothing: every file and folder LoRA Loom writes goes through here.

The data goes to a temp file in the target's folder, is fsynced, gets the permissions a new file
would get, and is renamed over the target; the folder is fsynced too. A crash leaves the old file or
the new one, never half of one. A folder (`atomic_dir`) is built as a hidden sibling and renamed
into place the same way, so a half-written model folder is never taken for a whole one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .graph_runtime.errors import LoomError


class TargetExistsError(LoomError, FileExistsError):
    """The file or folder LoRA Loom was asked to write exists already and is not to be replaced.
    ``file`` is that path. Also a FileExistsError, what it was before the error family existed."""

    kind = "exists"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _new_file_mode() -> int:
    return 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` appears complete, or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600; a saved file should look like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(path) as stage: write files into stage``: the folder ``path`` appears with
    everything written into ``stage``, or not at all.

    ``stage`` is an empty hidden folder beside ``path``; on success its files are fsynced and it is
    renamed to ``path``, on any error (or interrupt) it is removed. ``path`` must not exist yet, or be
    an empty folder: a folder rename cannot replace a full one atomically, and merging into an
    existing model folder would mix two models.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise TargetExistsError("already exists and is not an empty folder.", file=path,
                                value="a folder with files" if path.is_dir() else "a file",
                                limit="a new name or an empty folder", fix="choose a new name or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield stage
        for dirpath, _, filenames in os.walk(stage):
            for name in filenames:
                _fsync_file(Path(dirpath) / name)
            _fsync_dir(Path(dirpath))
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; a saved folder should look like any other
        if path.exists():
            path.rmdir()  # empty, checked above; rmdir refuses if something appeared since
        os.replace(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
