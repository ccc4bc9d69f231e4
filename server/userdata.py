"""What the editor saves on the server: its settings and its files (saved workflows, subgraphs),
under ``<user folder>/default/`` as ComfyUI lays them out. Never inside the package.

Every name goes through :func:`graph_runtime.resolve_under` ('..', absolute paths, NUL bytes,
backslashes and symlinks out of the folder are refused). Only ``.json`` files are written.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from ..graph_runtime.errors import PathError, WorkflowError
from ..graph_runtime.jsonio import loads_strict
from ..graph_runtime.paths import resolve_under
from ..atomic import atomic_write_bytes

log = logging.getLogger("loraloom.server")

SETTINGS_FILE = "comfy.settings.json"
READABLE = {".json": "application/json", ".css": "text/css"}
WRITABLE = (".json",)
FOLDERS = ("workflows", "subgraphs")
# Files the page asks for at start whether or not they exist; a missing one means this default.
DEFAULTS = {"comfy.templates.json": b"[]", "user.css": b""}
NAME_MAX = 255  # bytes in one file or folder name (Linux, macOS and Windows file systems alike)
PATH_MAX = 4096  # bytes in a whole path (Linux)


class Conflict(PathError):
    """The destination exists and overwriting was not asked for. ``value`` is the user file's name."""

    kind = "exists"

    def __init__(self, name: str):
        super().__init__(f"user file {name!r} exists.", value=name, fix="pass overwrite=true to replace it")


class UserData:
    """Settings and user files under ``<user_dir>/default``."""

    def __init__(self, user_dir: str | os.PathLike):
        self.root = Path(user_dir).absolute() / "default"
        for folder in FOLDERS:
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # settings

    def settings(self) -> dict:
        """The saved settings (a broken file is reported and read as empty, never overwritten silently)."""
        path = self.root / SETTINGS_FILE
        if not path.is_file():
            return {}
        try:
            data = loads_strict(path.read_bytes(), source=str(path))
        except WorkflowError as exc:
            log.error("settings file unreadable, using defaults: %s", exc)
            return {}
        if not isinstance(data, dict):
            log.error("settings file unreadable, using defaults: %s holds a JSON %s, not an object",
                      path, type(data).__name__)
            return {}
        return data

    def update_settings(self, values: dict) -> None:
        with self._lock:
            settings = self.settings()
            settings.update(values)
            atomic_write_bytes(self.root / SETTINGS_FILE, json.dumps(settings, indent=2).encode())

    # files

    def path(self, name: str, *, writing: bool = False) -> Path:
        """The file ``name`` under the user folder (not required to exist)."""
        too_long = [part for part in name.split("/") if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX]
        if too_long:
            raise PathError(f"user file name {name!r}: the part {too_long[0][:40]!r}... is longer than {NAME_MAX} "
                            "bytes", value=len(too_long[0].encode("utf-8", "surrogatepass")), limit=NAME_MAX,
                            kind="name_too_long", fix="use a shorter name")
        path = resolve_under(self.root, name, what="user file", must_exist=False)
        if len(os.fsencode(path)) >= PATH_MAX:
            raise PathError(f"user file name {name!r} makes a path longer than {PATH_MAX} bytes",
                            limit=PATH_MAX, kind="name_too_long", fix="use a shorter name")
        if writing and path.is_dir():
            raise PathError(f"user file {name!r} is a folder", value=name, kind="is_folder",
                            fix="choose another name")
        allowed = WRITABLE if writing else tuple(READABLE)
        if path.suffix.lower() not in allowed:
            raise PathError(f"user file {name!r}: only {', '.join(allowed)} files can be "
                            f"{'written' if writing else 'read'} here")
        return path

    def read(self, name: str) -> tuple[bytes, str] | None:
        """(content, content type), a default for the files the page always asks for, or None."""
        path = self.path(name)
        content_type = READABLE[path.suffix.lower()]
        if path.is_file():
            return path.read_bytes(), content_type
        if name in DEFAULTS:
            return DEFAULTS[name], content_type
        return None

    def write(self, name: str, data: bytes, overwrite: bool) -> Path:
        """Write a ``.json`` file atomically; its content must be JSON within the nesting limits."""
        path = self.path(name, writing=True)
        loads_strict(data, source=f"user file {name!r}")
        with self._lock:
            if path.exists() and not overwrite:
                raise Conflict(name)
            atomic_write_bytes(path, data)
        return path

    def delete(self, name: str) -> bool:
        path = self.path(name)
        with self._lock:
            if not path.is_file():
                return False
            path.unlink()
        return True

    def move(self, source: str, dest: str, overwrite: bool) -> Path | None:
        src = self.path(source)
        dst = self.path(dest, writing=True)
        with self._lock:
            if not src.is_file():
                return None
            if dst.exists() and not overwrite:
                raise Conflict(dest)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        return dst

    def listing(self, folder: str, *, recurse: bool, full_info: bool, split: bool) -> list | None:
        """ComfyUI's ``GET /userdata?dir=`` answer, or None when the folder does not exist."""
        base = self.root if folder in ("", ".") else resolve_under(self.root, folder.rstrip("/"),
                                                                   what="user folder", must_exist=False)
        if not base.is_dir():
            return None
        files = sorted(p for p in (base.rglob("*") if recurse else base.glob("*"))
                       if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(self.root.resolve()))
        out = []
        for p in files:
            rel = p.relative_to(base).as_posix()
            if full_info:
                stat = p.stat()
                out.append({"path": rel, "size": stat.st_size, "modified": stat.st_mtime, "created": stat.st_ctime})
            elif split:
                out.append([rel, *rel.split("/")])
            else:
                out.append(rel)
        return out

    def info(self, path: Path) -> dict:
        stat = path.stat()
        return {"path": path.relative_to(self.root).as_posix(), "size": stat.st_size, "modified": stat.st_mtime,
                "created": stat.st_ctime}

