"""Whole files or nothing: every file and folder LoRA Loom writes goes through here.

The data goes to a temp file in the target's folder, is fsynced, gets the permissions a new file
would get, and is renamed over the target; the folder is fsynced too. A crash leaves the old file or
the new one, never half of one. A folder (`atomic_dir`) is built as a hidden sibling and renamed
into place the same way, so a half-written model folder is never taken for a whole one.

New outputs (`atomic_new`) never replace anything: the file or folder is written completely under
a hidden temp name first, then given the first free name of a numbered series in one step that
fails if the name is taken (another process or thread saving into the same folder at the same
moment), and the next number is tried. So N concurrent savers always leave N complete outputs.

Every temp name is ``.<name>.<host>-<pid>.<random>.tmp``: `remove_stale_temps` deletes the ones a
process of this machine left behind when it was killed mid-write (its pid no longer runs).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


# The machine's tag in temp names: a pid means something only on the machine that wrote it (an output
# folder on a network share is written by several), so only this machine's temps are ever judged.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp$")


def _temp_prefix(name: str) -> str:
    return f".{name}.{_HOST}-{os.getpid()}."

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp")
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

    ``stage`` is an empty hidden folder beside ``path``; on success its files are fsynced, it and
    everything in it get the modes the umask gives new folders and files, and it is renamed to ``path``, on any error (or interrupt) it is removed. ``path`` must not exist yet, or be
    an empty folder: a folder rename cannot replace a full one atomically, and merging into an
    existing model folder would mix two models.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise TargetExistsError("already exists and is not an empty folder.", file=path,
                                value="a folder with files" if path.is_dir() else "a file",
                                limit="a new name or an empty folder", fix="choose a new name or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp"))
    try:
        yield stage
        # Everything in it gets the modes a new folder and file get under the umask: mkdtemp makes
        # the folder 0700, and some writers make their files 0600 (safetensors' save_file does).
        file_mode, dir_mode = _new_file_mode(), 0o777 & ~_umask()
        for dirpath, dirnames, filenames in os.walk(stage):
            for name, mode in [*((n, file_mode) for n in filenames), *((n, dir_mode) for n in dirnames)]:
                entry = Path(dirpath) / name
                if entry.is_symlink():
                    continue  # a link's target is not ours to change
                if mode == file_mode:
                    _fsync_file(entry)
                os.chmod(entry, mode)
            _fsync_dir(Path(dirpath))
        os.chmod(stage, dir_mode)
        if path.exists():
            path.rmdir()  # empty, checked above; rmdir refuses if something appeared since
        os.replace(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


class NewOutput:
    """What `atomic_new` hands the block: write the new file (or folder) at ``stage``; once the block
    has ended, ``path`` is the name it was given."""

    def __init__(self, stage: Path):
        self.stage = stage
        self.path: Path | None = None


@contextlib.contextmanager
def atomic_new(name_for: Callable[[int], Path], *, folder: bool = False) -> Iterator[NewOutput]:
    """``with atomic_new(lambda n: out / f"img_{n:05d}_.png") as new: write(new.stage)``: the file (or,
    with ``folder=True``, the folder) written at ``new.stage`` appears complete under the first free
    name ``name_for(1)``, ``name_for(2)``, ... (all in one folder), and never replaces anything.

    ``new.stage`` lies in a hidden temp folder beside the targets. When the block ends, the name is
    taken in one step that fails if the name exists, and the next number is tried, so concurrent
    savers (threads or processes) into one folder each keep their own output:

    - a file is hard-linked to its name (``link`` never replaces; a filesystem without hard links,
      e.g. FAT, gets the name created exclusively first, then renamed over: there a reader can see
      an empty file for that moment, and a crash in it leaves one);
    - a folder's name is reserved by ``mkdir`` (exclusive), then the staged folder is renamed onto
      that empty folder; a crash between the two leaves an empty folder under the name, never a
      partial one.

    On an error (or interrupt) in the block nothing appears and the temp folder is removed.
    """
    n = 1
    while os.path.lexists(name_for(n)):
        n += 1
    first = Path(name_for(n))
    parent = first.parent
    parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(first.name), suffix=".tmp"))
    new = NewOutput(holder / first.name)
    try:
        yield new
        if not (new.stage.is_dir() if folder else new.stage.is_file()):
            raise FileNotFoundError(f"{new.stage}: the block wrote no {'folder' if folder else 'file'} there")
        while True:
            target = Path(name_for(n))
            if target.parent != parent:
                raise ValueError(f"{target}: every numbered name must lie in {parent}")
            try:
                (_publish_folder if folder else _publish_file)(new.stage, target)
                break
            except FileExistsError:
                n += 1
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    _fsync_dir(parent)
    new.path = target


# link() errors that mean "this filesystem has no hard links", not "this name is taken"
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def _publish_file(stage: Path, target: Path) -> None:
    try:
        os.link(stage, target)  # FileExistsError if the name is taken: never replaces
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # the reservation
        os.replace(stage, target)


def _publish_folder(stage: Path, target: Path) -> None:
    os.mkdir(target)  # FileExistsError if the name is taken: the reservation
    try:
        # A folder renamed onto an empty folder replaces it (POSIX); onto a full one it fails, so
        # a reservation someone filled meanwhile is never lost either.
        os.rename(stage, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(target)
        raise


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return False  # beyond any pid this machine can have
    except OSError:
        return True  # it exists (PermissionError: another user's)
    return True


def remove_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Delete the temp files and folders that writers of this machine left under ``root`` (any
    depth) when they were killed mid-write: ours by name, written by a process no longer running.
    A live writer's temps, another machine's and anything not named like ours are left alone (so is
    a dead writer's whose pid a new process has taken since, until that one ends). Returns what was
    removed; an entry that cannot be removed is skipped."""
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are not followed
        for name in [*dirnames, *filenames]:
            match = _TEMP_NAME.match(name)
            if not match or match["host"] != _HOST or _pid_alive(int(match["pid"])):
                continue
            path = Path(dirpath) / name
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError:
                continue
            removed.append(path)
        dirnames[:] = [d for d in dirnames if not _TEMP_NAME.match(d)]
    return removed
