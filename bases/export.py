"""Write a pipeline out in the forms `load_base` reads: a diffusers folder, a single-file
checkpoint in the original key layout (SD/SGM, or a Flux / SD3.5 transformer's BFL / MMDiT names:
what A1111, ComfyUI and diffusers' ``from_single_file`` load; the SaveCheckpoint node), and a
config skeleton (JSON + tokenizers, no weights) that single-file loading needs to stay offline.

Every writer goes through `atomic`: the output is built beside the target and renamed into place,
so a crash never leaves a half-written model that a later load would take for a whole one.
"""
from __future__ import annotations

from pathlib import Path

from ..atomic import TargetExistsError, atomic_dir
from ..lora.writers import atomic_save
from . import arch as arch_mod
from ..lora.arches import ARCHES
from . import dit_file, ldm_keys
from .arch import BaseModelError

SINGLE_FILE_FORMAT = "loraloom-single-file"


def save_diffusers_folder(pipe, folder: str | Path) -> Path:
    """Save `pipe` as a diffusers folder (save_pretrained, safetensors weights); returns the folder."""
    folder = Path(folder)
    with atomic_dir(folder) as stage:
        pipe.save_pretrained(stage, safe_serialization=True)
    return folder


def save_config_skeleton(pipe, folder: str | Path) -> Path:
    """Write the config skeleton of `pipe`: model_index.json, each component's config and the
    tokenizers, no weights. `from_single_file(path, config=folder)` reads it instead of the hub."""
    folder = Path(folder)
    with atomic_dir(folder) as stage:
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
                raise BaseModelError(f"component {name!r} ({type(component).__name__}): no way to save its config",
                                     key=name, value=type(component).__name__, kind="unsaveable_component")
    return folder


def save_single_file(pipe, path: str | Path) -> Path:
    """Save `pipe` as one .safetensors checkpoint with the original key names: the whole SD1.5
    (LDM) / SDXL (SGM) pipeline; for Flux and SD3.5 the transformer alone (BFL / MMDiT names, as
    flux1-dev.safetensors ships and ComfyUI's diffusion-model loader reads). Weights keep their
    dtype. Returns the path. Load it with `load_base(path, config=...)` and a config folder (see
    save_config_skeleton; for Flux / SD3.5 a diffusers folder, which brings the text encoders and
    VAE)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BaseModelError("single-file checkpoints are written as .safetensors.", file=path, value=path.suffix,
                             limit=".safetensors", fix="use a .safetensors name", kind="bad_suffix")
    if path.exists():
        raise TargetExistsError("already exists.", file=path, value="a file" if path.is_file() else "a folder",
                                limit="a new name", fix="choose a new path or remove it first")
    arch = arch_mod.detect_pipeline_arch(pipe)
    if ARCHES[arch].denoiser == "transformer":
        tensors = dit_file.to_original(pipe.transformer.state_dict(), arch)
    else:
        tensors = ldm_keys.pipeline_to_original(pipe, arch)
    return atomic_save(tensors, path, {"format": "pt", "writer": SINGLE_FILE_FORMAT, "arch": arch})


def save_single_file_with_config(pipe, path: str | Path, config_folder: str | Path) -> tuple[Path, Path]:
    """Both halves of an offline single-file model: the checkpoint at `path` and its config
    skeleton at `config_folder`. Returns (path, config_folder)."""
    return save_single_file(pipe, path), save_config_skeleton(pipe, config_folder)
