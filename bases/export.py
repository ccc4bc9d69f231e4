"""Write a pipeline out in the forms `load_base` reads: a diffusers folder, a single-file
checkpoint in the original key layout (SD/SGM, or a Flux / SD3.5 transformer's BFL / MMDiT names:
what A1111, ComfyUI and diffusers' ``from_single_file`` load; the SaveCheckpoint node), and a
config skeleton (JSON + tokenizers, no weights) that single-file loading needs to stay offline.

Every writer goes through `atomic`: the output is built beside the target and renamed into place,
so a crash never leaves a half-written model that a later load would take for a whole one.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..atomic import TargetExistsError, atomic_dir
from ..lora.writers import atomic_save
from . import arch as arch_mod
from ..lora.arches import ARCHES
from . import auto_config, dit_file, ldm_keys
from .arch import BaseModelError

SINGLE_FILE_FORMAT = auto_config.WRITER


def config_files(pipe) -> dict[str, dict]:
    """The JSON files of `pipe`'s config skeleton (model_index.json and each model's and the
    scheduler's config, as save_config_skeleton writes them; no tokenizers), by relative path."""
    files = {"model_index.json": json.loads(json.dumps({"_class_name": type(pipe).__name__, **{
        k: v for k, v in pipe.config.items() if not k.startswith("_")}}))}
    for name, component in pipe.components.items():
        if component is None or hasattr(component, "tokenize"):
            continue
        if hasattr(component, "to_json_string"):  # diffusers models and schedulers
            rel = "scheduler_config.json" if name == "scheduler" else "config.json"
            files[f"{name}/{rel}"] = json.loads(component.to_json_string())
        elif hasattr(component, "config") and hasattr(component.config, "to_json_string"):
            files[f"{name}/config.json"] = json.loads(component.config.to_json_string())
    return files


def builtin_tokenizer_pads(pipe) -> dict[str, str] | None:
    """{tokenizer component: pad token} when every tokenizer of `pipe` is the tiny presets' built-in
    one (whose vocabulary no file holds), else None."""
    from .presets import build_tokenizer

    vocab = build_tokenizer().get_vocab()
    tokenizers = {n: c for n, c in pipe.components.items() if c is not None and hasattr(c, "tokenize")}
    if not tokenizers or any(t.get_vocab() != vocab for t in tokenizers.values()):
        return None
    return {name: str(t.pad_token) for name, t in tokenizers.items()}


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
    dtype. Returns the path. An SD1.5 / SDXL file records its pipeline's configs (and, for the
    tiny presets, that its tokenizers are the built-in ones) in its metadata, so `load_base(path)`
    (config "auto") rebuilds it exactly; a Flux / SD3.5 file records them too, but its text encoders
    and VAE come from their own files (config "auto" finds them: bases.dit_parts) or from `config=`
    a diffusers folder."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BaseModelError("single-file checkpoints are written as .safetensors.", file=path, value=path.suffix,
                             limit=".safetensors", fix="use a .safetensors name", kind="bad_suffix")
    if path.exists():
        raise TargetExistsError("already exists.", file=path, value="a file" if path.is_file() else "a folder",
                                limit="a new name", fix="choose a new path or remove it first")
    arch = arch_mod.detect_pipeline_arch(pipe)
    # the exact configs, so config="auto" rebuilds this very pipeline (see bases.auto_config); a Flux /
    # SD3.5 file uses its transformer's and scheduler's (the other parts come from their own files)
    metadata = {"format": "pt", "writer": SINGLE_FILE_FORMAT, "arch": arch,
                auto_config.CONFIGS_KEY: json.dumps(config_files(pipe), sort_keys=True)}
    if ARCHES[arch].denoiser == "transformer":
        tensors = dit_file.to_original(pipe.transformer.state_dict(), arch)
    else:
        tensors = ldm_keys.pipeline_to_original(pipe, arch)
        pads = builtin_tokenizer_pads(pipe)
        if pads is not None:
            metadata[auto_config.TOKENIZERS_KEY] = json.dumps(pads, sort_keys=True)
    return atomic_save(tensors, path, metadata)


def save_single_file_with_config(pipe, path: str | Path, config_folder: str | Path) -> tuple[Path, Path]:
    """Both halves of an offline single-file model: the checkpoint at `path` and its config
    skeleton at `config_folder`. Returns (path, config_folder)."""
    return save_single_file(pipe, path), save_config_skeleton(pipe, config_folder)
