"""Where LoRA files, base models and outputs live, and the one helper that resolves a name under a root.

Configured the same way everywhere: ``Runtime(...)`` / CLI flags first, then the environment
(``LORALOOM_LORA_DIRS`` (os.pathsep-separated), ``LORALOOM_MODELS_DIR``, ``LORALOOM_OUTPUT_DIR``),
then defaults under the current directory (``models/``, ``models/loras/``, ``output/``).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Mapping

from .errors import PathError

ENV_LORA_DIRS = "LORALOOM_LORA_DIRS"
ENV_MODELS_DIR = "LORALOOM_MODELS_DIR"
ENV_OUTPUT_DIR = "LORALOOM_OUTPUT_DIR"
# The folder the user chose for torch's inductor cache, read as LoRA Loom is imported (bases/pool.py
# compiles there): importing torch._dynamo, which importing diffusers does, writes torch's own
# default into the variable, so a later read could not tell the user's choice from torch's.
INDUCTOR_CACHE_AT_IMPORT = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or None


def user_cache_root(env: Mapping[str, str] | None = None) -> Path:
    """LoRA Loom's folder in the user's cache, where its caches live (the disk cache of results,
    torch.compile's inductor cache): ``%LOCALAPPDATA%/loraloom`` on Windows, else
    ``$XDG_CACHE_HOME/loraloom``, else ``~/.cache/loraloom``. Never the temp folder, which many
    systems empty at every reboot."""
    env = os.environ if env is None else env
    if sys.platform == "win32" and env.get("LOCALAPPDATA"):
        return Path(env["LOCALAPPDATA"]) / "loraloom"
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "loraloom"
# Previews live in <output>/temp/: ComfyUI's file type "temp" (``/view?type=temp``), which the
# preview nodes write and the server serves.
TEMP_SUBFOLDER = "temp"
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
# LoRAs saved into the output folder (SaveLoRA's default prefix is "loras/...") are offered beside
# the LoRA folders' files, named as ComfyUI names a file of its output folder (LoadImage's
# "name [output]", folder_paths' annotated file paths): "loras/merge_00001_.safetensors [output]".
# A listed LoRA name ends in its suffix (".safetensors"), so no file of a LoRA folder is ever
# offered under such a name: the two cannot be confused. ComfyUI's own LoraLoader lists only its
# loras folders; we leave those as they are (adding the output folder there would offer bare names
# that can shadow one another).
SAVED_LORAS = "loras"
OUTPUT_MARK = " [output]"


@dataclass(frozen=True)
class FolderAdvice:
    """The ``Fix:`` of path errors: how a user puts a file where this runtime looks. The command line
    names its flags; inside ComfyUI (see ``comfy_integration``) the advice names ComfyUI's folders.

    Per folder kind (``"loras"``, ``"models"``, ``"output"``): ``outside`` for a name that leaves its
    folder, ``missing`` for a name not found.
    """

    outside: dict[str, str]
    missing: dict[str, str]


_ADD_WITH_FLAGS = "put it there or add its folder (--lora-dir / --models-dir)"
_RELATIVE = "give a path relative to the folder"
CLI_ADVICE = FolderAdvice(
    outside={"loras": f"{_RELATIVE}, or add the folder with --lora-dir",
             "models": f"{_RELATIVE}, or set the models folder with --models-dir",
             "output": "give a name relative to the output folder (set with --output-dir)",
             "checkpoints": f"{_RELATIVE}"},
    missing={"loras": _ADD_WITH_FLAGS, "models": _ADD_WITH_FLAGS, "output": _ADD_WITH_FLAGS,
             "checkpoints": _ADD_WITH_FLAGS},
)


def check_relative_name(name: str, what: str = "file", *, fix: str | None = _RELATIVE) -> PurePosixPath:
    """Validate a user-given relative name: no NUL, no backslash, not absolute, no '..' part. ``fix``
    is the advice of the error (see :class:`FolderAdvice`)."""
    if not isinstance(name, str) or not name:
        raise PathError(f"{what} name {name!r} must be a non-empty string", value=name, kind="bad_name")
    problem = None
    if "\x00" in name:
        problem = "contains a NUL byte"
    elif "\\" in name:
        problem = "contains a backslash (Windows separator); use '/'"
    elif name.startswith("/") or _DRIVE_RE.match(name):
        problem = "is an absolute path"
    elif ".." in PurePosixPath(name).parts:
        problem = "contains a '..' part"
    if problem:
        raise PathError(f"{what} name {name!r} {problem}: names must stay inside the configured folder.",
                        value=name, fix=fix, kind="bad_name")
    return PurePosixPath(name)


def resolve_under(root: str | os.PathLike, name: str, *, what: str = "file", must_exist: bool = True,
                  fix: str | None = _RELATIVE) -> Path:
    """Resolve ``name`` under ``root``, refusing '..', absolute paths and symlinks that lead outside
    (``fix``: the advice of a refusal of the name itself)."""
    rel = check_relative_name(name, what, fix=fix)
    try:
        root_real = Path(root).resolve()
        candidate = (root_real / Path(*rel.parts)).resolve()
    except (RuntimeError, OSError) as exc:  # Python < 3.13 raises RuntimeError for a symlink loop
        raise PathError(f"{what} {name!r} cannot be resolved under {root}: {exc}", value=name, limit=str(root),
                        fix="remove the symlink loop", kind="bad_link") from None
    if not candidate.is_relative_to(root_real):
        raise PathError(f"{what} {name!r} resolves to {candidate}, outside the folder {root_real} "
                        "(a symlink out of the root?); refusing to read it",
                        value=name, limit=str(root_real), kind="outside_root")
    if must_exist and not candidate.exists():
        raise PathError(f"{what} {name!r} not found in {root_real}", value=name, limit=str(root_real),
                        kind="not_found")
    return candidate


def _walk(root: Path, suffixes: tuple[str, ...], dirs: bool, hidden: bool = True) -> list[str]:
    """Names (relative, '/'-separated) of the regular files (or folders) inside ``root`` that end in
    one of ``suffixes``; none that a symlink leads out of ``root``; with ``hidden=False`` none in or
    of a hidden ('.') folder or file."""
    if not root.is_dir():
        return []
    names = []
    root_real = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root_real, followlinks=False):
        here = Path(dirpath)
        if not hidden:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        dirnames.sort()
        for entry in sorted(dirnames if dirs else filenames):
            full = here / entry
            if not hidden and entry.startswith("."):
                continue
            if suffixes and not entry.lower().endswith(suffixes):
                continue
            if not dirs and not full.is_file():  # a FIFO, device or socket is never offered
                continue
            if not full.resolve().is_relative_to(root_real):
                continue
            names.append(full.relative_to(root_real).as_posix())
    return names


def _not_a_folder(root: Path) -> str:
    if root.is_dir():
        return ""
    return " (not a folder)" if root.exists() else " (does not exist)"


@dataclass
class Folders:
    """The configured roots. ``kind`` is ``"loras"``, ``"models"``, ``"output"`` or ``"checkpoints"``.
    ``advice`` is the ``Fix:`` its path errors give (how to add a file or folder where this runtime runs).

    Inside ComfyUI (see ``comfy_integration``) four more are set from ComfyUI's own folders:
    ``checkpoint_dirs`` (its ``checkpoints`` and ``diffusion_models`` folders: LoadBase then lists
    single files by their name in these, as ComfyUI's checkpoint and diffusion-model loaders do),
    ``tokenizer_dirs`` (folders holding tokenizer files that a checkpoint's config "auto" may use),
    ``part_dirs`` (folder kind -> folders where config "auto" finds a Flux / SD3.5 transformer's other
    parts: "text_encoders", "vae", "t5_tokenizer") and ``lora_save_dir`` (where SaveLoRA writes, so
    that every LoRA loader lists the file). Elsewhere they stay empty / None: single files are named
    by their path in the models folder and SaveLoRA writes into the output folder.
    """

    lora_dirs: list[Path] = field(default_factory=list)
    models_dir: Path = Path("models")
    output_dir: Path = Path("output")
    advice: FolderAdvice = CLI_ADVICE
    checkpoint_dirs: list[Path] = field(default_factory=list)
    tokenizer_dirs: list[Path] = field(default_factory=list)
    part_dirs: dict[str, list[Path]] = field(default_factory=dict)
    lora_save_dir: Path | None = None

    @classmethod
    def configure(cls, lora_dirs=None, models_dir=None, output_dir=None, env=None) -> "Folders":
        """Arguments first, then environment variables, then defaults under the current directory."""
        env = os.environ if env is None else env
        models = Path(models_dir or env.get(ENV_MODELS_DIR) or "models")
        if lora_dirs:
            loras = [Path(d) for d in lora_dirs]
        elif env.get(ENV_LORA_DIRS):
            loras = [Path(d) for d in env[ENV_LORA_DIRS].split(os.pathsep) if d]
        else:
            loras = [models / "loras"]
        output = Path(output_dir or env.get(ENV_OUTPUT_DIR) or "output")
        return cls([p.absolute() for p in loras], models.absolute(), output.absolute())

    def roots(self, kind: str) -> list[Path]:
        if kind == "loras":
            return list(self.lora_dirs)
        if kind == "models":
            return [self.models_dir]
        if kind == "output":
            return [self.output_dir]
        if kind == "checkpoints":
            return list(self.checkpoint_dirs)
        raise PathError(f"unknown folder kind {kind!r}; expected one of 'loras', 'models', 'output', 'checkpoints'",
                        value=kind, limit=["loras", "models", "output", "checkpoints"], kind="unknown_kind")

    def find(self, kind: str, name: str) -> Path:
        """The first existing ``name`` under the roots of ``kind``; an error lists the roots searched.
        A LoRA name ending in ``" [output]"`` is a LoRA saved into the output folder (see :data:`SAVED_LORAS`)."""
        if kind == "loras" and isinstance(name, str) and name.endswith(OUTPUT_MARK):
            return self._find_saved_lora(name)
        fix = self.advice.outside.get(kind)
        check_relative_name(name, kind.rstrip("s"), fix=fix)
        for root in self.roots(kind):
            if not root.is_dir():
                continue
            path = resolve_under(root, name, what=kind.rstrip("s"), must_exist=False, fix=fix)
            if path.exists():
                return path
        searched = ", ".join(str(r) for r in self.roots(kind))
        raise PathError(f"{kind.rstrip('s')} {name!r} not found in {self.searched(kind)}.", value=name,
                        limit=searched, fix=self.advice.missing[kind], kind="not_found")

    def _find_saved_lora(self, name: str) -> Path:
        rel = name[: -len(OUTPUT_MARK)]
        check_relative_name(rel, "lora", fix=self.advice.outside["output"])
        parts = PurePosixPath(rel).parts
        root = self.output_dir / SAVED_LORAS
        if len(parts) < 2 or parts[0] != SAVED_LORAS:
            raise PathError(f"lora {name!r}: a saved LoRA is named by its path in the output folder, which starts "
                            f"with '{SAVED_LORAS}/' (only {root} is searched).", value=name,
                            limit=f"{SAVED_LORAS}/...{OUTPUT_MARK}", kind="bad_name")
        path = resolve_under(root, PurePosixPath(*parts[1:]).as_posix(), what="lora", must_exist=False,
                             fix=self.advice.outside["output"])
        if not path.exists():
            raise PathError(f"lora {name!r} not found in {root}{_not_a_folder(root)}.", value=name,
                            limit=str(root), fix="save it there with SaveLoRA first", kind="not_found")
        return path

    def lora_name(self, path: str | os.PathLike) -> str | None:
        """The name under which :meth:`list` offers the LoRA file at ``path`` (None: in no folder)."""
        path = Path(path)
        for root in self.lora_dirs:
            if path.is_relative_to(root.resolve()):
                return path.relative_to(root.resolve()).as_posix()
        saved = (self.output_dir / SAVED_LORAS).resolve()
        if path.is_relative_to(saved):
            return f"{SAVED_LORAS}/{path.relative_to(saved).as_posix()}{OUTPUT_MARK}"
        return None

    def searched(self, kind: str) -> str:
        """The roots of ``kind`` as an error names them, each one that is no folder marked so: a
        mistyped ``--lora-dir`` shows up as the reason a name is not found."""
        return ", ".join(f"{root}{_not_a_folder(root)}" for root in self.roots(kind))

    def list(self, kind: str, suffixes: tuple[str, ...] = (), dirs: bool = False) -> list[str]:
        """Names (relative, '/'-separated) of regular files (or folders, with ``dirs``) under the roots;
        for ``"loras"`` then the LoRAs saved into the output folder, as ``loras/<name> [output]``."""
        names = sorted({name for root in self.roots(kind) for name in _walk(root, suffixes, dirs)})
        if kind == "loras":  # not what a save is writing: it stages in a hidden folder beside its name
            names += [f"{SAVED_LORAS}/{name}{OUTPUT_MARK}"
                      for name in _walk(self.output_dir / SAVED_LORAS, suffixes, dirs, hidden=False)]
        return names

    def ref_root(self, kind: str) -> Path:
        """The folder a saved file's reference ``{"filename", "subfolder", "type": kind}`` is relative to
        (ComfyUI's ``/view`` roots): the output folder, or its ``temp/`` subfolder for kind "temp"."""
        root = self.output_dir.resolve()
        return root / TEMP_SUBFOLDER if kind == "temp" else root

    def output_path(self, name: str, root: Path | None = None) -> Path:
        """Where an output named ``name`` is written: inside ``root`` (default: the output folder; its
        parent folder is created on demand)."""
        path = resolve_under((root or self.output_dir).absolute(), name, what="output", must_exist=False,
                             fix=self.advice.outside["output"])
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
