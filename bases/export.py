"""Write a pipeline out in the forms `load_base` reads: a diffusers folder, a single-file
checkpoint in the original SD/SGM key layout, and a config skeleton (JSON + tokenizers, no weights)
that single-file loading needs to stay offline.

Every writer builds its output next to the target and renames it into place, so a crash never
leaves a half-written model that a later load would take for a whole one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import arch as arch_mod
from . import ldm_keys

SINGLE_FILE_FORMAT = "loraloom-single-file"


def _check_free(target: Path) -> None:
    if target.exists() and (target.is_file() or any(target.iterdir())):
        raise ValueError(f"{target} already exists and is not empty. Fix: choose a new path or remove it first")


@contextmanager
def _staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty sibling folder; on success it replaces `target` (which must be absent or empty)."""
    _check_free(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield stage
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def save_diffusers_folder(pipe, folder: str | Path) -> Path:
    """Save `pipe` as a diffusers folder (save_pretrained, safetensors weights); returns the folder."""
    folder = Path(folder)
    with _staged_folder(folder) as stage:
        pipe.save_pretrained(stage, safe_serialization=True)
    return folder


def save_config_skeleton(pipe, folder: str | Path) -> Path:
    """Write the config skeleton of `pipe`: model_index.json, each component's config and the
    tokenizers, no weights. `from_single_file(path, config=folder)` reads it instead of the hub."""
    folder = Path(folder)
    with _staged_folder(folder) as stage:
        pipe.save_config(stage)  # model_index.json
        for name, component in pipe.components.items():
            if component is None:
                continue
            sub = stage / name
            if hasattr(component, "save_config"):  # diffusers models and schedulers
                component.save_config(sub)
            elif hasattr(component, "tokenize"):  # tokenizers: vocab files are the config
                component.save_pretrained(sub)
            elif hasattr(component, "config") and hasattr(component.config, "save_pretrained"):
                component.config.save_pretrained(sub)  # transformers models: config.json only
            elif hasattr(component, "save_pretrained"):  # image processors write only JSON
                component.save_pretrained(sub)
            else:
                raise ValueError(f"component {name!r} ({type(component).__name__}): no way to save its config")
    return folder


def save_single_file(pipe, path: str | Path) -> Path:
    """Save `pipe` as one .safetensors checkpoint with the original SD1.5 (LDM) / SDXL (SGM) key
    names; weights keep their dtype. Returns the path. Load it with `load_base(path, config=...)`
    and a config folder (see save_config_skeleton)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors. Fix: use a .safetensors name")
    _check_free(path)
    arch = arch_mod.detect_pipeline_arch(pipe)
    tensors = ldm_keys.pipeline_to_original(pipe, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "writer": SINGLE_FILE_FORMAT, "arch": arch})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_single_file_with_config(pipe, path: str | Path, config_folder: str | Path) -> tuple[Path, Path]:
    """Both halves of an offline single-file model: the checkpoint at `path` and its config
    skeleton at `config_folder`. Returns (path, config_folder)."""
    return save_single_file(pipe, path), save_config_skeleton(pipe, config_folder)
