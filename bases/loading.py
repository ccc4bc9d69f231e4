"""Load a base model from a built-in preset, a diffusers folder, or a single-file checkpoint with a
local config folder, always offline.

`load_base` returns a LoadedBase: the live pipeline plus what the rest of LoRA Loom keys on
(architecture, dtype, device, fingerprint). The model pool owns the pipeline; wires carry only the
description.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..graph_runtime import file_fingerprint
from . import arch as arch_mod
from .arch import BaseModelError
from . import checks, devices, presets


@dataclass(frozen=True)
class LoadedBase:
    """A loaded base model.

    pipeline: the diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline).
    arch: "sd15" or "sdxl". dtype / device: where its weights live.
    fingerprint: "preset:<name>@<version>" for presets; "folder:sha256:<hex>" or
        "single-file:sha256:<hex>+config:sha256:<hex>" (content hashes, memoised on path, size
        and mtime by graph_runtime's file_fingerprint) for files, so it changes exactly when the weights
        or configs can.
    source: what was asked for (preset name or path), for messages.
    """

    pipeline: Any
    arch: str
    dtype: torch.dtype
    device: torch.device
    fingerprint: str
    source: str

    @property
    def dtype_name(self) -> str:
        """"fp32", "fp16" or "bf16"."""
        return devices.dtype_name(self.dtype)


def _pipeline_class(arch: str):
    import diffusers

    return getattr(diffusers, arch_mod.PIPELINE_CLASSES[arch])


def _extra_kwargs(arch: str) -> dict[str, Any]:
    # Real SD1.5 folders list a safety checker: skip loading it (hundreds of MB, and ComfyUI-style
    # workflows never run it). The SDXL pipeline has no such component.
    return {"safety_checker": None, "requires_safety_checker": False} if arch == "sd15" else {}


def _own_memory(pipe) -> None:
    """Copy every weight into memory the process owns.

    safetensors loads can leave CPU tensors as views into the memory-mapped file: a later rewrite
    of that file would change a live model under the pool, and unaligned views even change float
    results (a different BLAS path: 2e-7 on the SDXL text projection). On other devices `.to()`
    already copied them.
    """
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in itertools.chain(component.parameters(), component.buffers()):
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


@dataclass(frozen=True)
class BaseIdentity:
    """What a base model is, known before any weight is read: what the model pool keys on, so a
    base already in the pool is never built a second time.

    source: what was asked for (preset name or path), for messages. kind: "preset", "folder" or
    "single-file". config: the config folder of a single file. arch, dtype, device and
    fingerprint: as in LoadedBase ("auto" already resolved).
    """

    source: str
    kind: str
    arch: str
    dtype: torch.dtype
    device: torch.device
    fingerprint: str
    config: Path | None = None

    @property
    def dtype_name(self) -> str:
        """"fp32", "fp16" or "bf16"."""
        return devices.dtype_name(self.dtype)


_checked_folders: dict[tuple[str, str], checks.CheckedFolder] = {}


def _check_folder(path: Path, fingerprint: str, weights: bool = True) -> checks.CheckedFolder:
    """checks.check_folder, remembered by content fingerprint: a folder is checked once per content."""
    key = (os.path.realpath(path), f"{fingerprint}:{weights}")
    if key not in _checked_folders:
        _checked_folders[key] = checks.check_folder(path, weights)
    return _checked_folders[key]


def _check_single_file(path: Path, config: str | Path | None) -> tuple[str, Path]:
    """The architecture of a single-file checkpoint and its checked config folder. Only the header
    is read here; load_base checks every value before diffusers opens the file."""
    if path.suffix.lower() != ".safetensors":
        raise BaseModelError(
            f"{path}: only .safetensors checkpoints are loaded ({path.suffix or 'no suffix'} files may "
            "be pickles, which can run code).", value=path.suffix, limit=".safetensors",
            fix="convert it to .safetensors first"
        )
    header = checks.weights_header(path)
    arch = arch_mod.detect_checkpoint_arch(header.tensors, str(path))
    if config is None:
        raise BaseModelError(
            f"single-file checkpoint {path} needs a config folder: its configs and tokenizers would "
            f"otherwise come from the Hugging Face hub, and loading is offline.",
            fix=f"pass config=<folder> holding model_index.json, the component configs and tokenizers of an "
                f"{arch} pipeline — a diffusers folder of the same architecture, or a skeleton written by "
                "bases.export.save_config_skeleton"
        )
    config = Path(config)
    if not config.is_dir():
        raise BaseModelError(f"config folder {config} for {path}: no such folder.", value=str(config), kind="not_found",
                             fix="pass the folder that holds model_index.json")
    config_arch = arch_mod.detect_folder_arch(config)
    if config_arch != arch:
        raise BaseModelError(
            f"single-file checkpoint {path} is {arch}, but config folder {config} describes {config_arch}.",
            value=config_arch, limit=arch, fix=f"pass a config folder of an {arch} pipeline"
        )
    shapes = _check_folder(config, file_fingerprint(config), weights=False).shapes
    checks.check_budget(config, "the pipeline", shapes, header.tensors.values(), path)
    return arch, config


def _check_weights_of(folder: Path) -> None:
    """Check every value of a diffusers folder's weights files on the read that also hashes each
    (``check_weights`` remembers the digest): the folder's fingerprint then reads no weights file
    again, and ``load_base`` finds them checked. One read of each file for both, not two."""
    components = checks.check_model_index(folder)
    for name in checks.MODEL_COMPONENTS:
        if components.get(name, (None, None)) != (None, None):
            for path in checks.weight_files(folder, name):
                checks.check_weights(path)


def identify_base(
    source: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    config: str | Path | None = None,
) -> BaseIdentity:
    """Check a base's arguments and say what it is, reading configs and hashing files (memoised)
    but building nothing. Every config and weights header is checked here, and every weights value,
    on the read that hashes the file (see bases.checks). Arguments as for load_base; it raises the
    same errors."""
    torch_dtype, torch_device = devices.resolve(dtype, device)
    name = str(source)
    if isinstance(source, str) and source in presets.PRESETS:
        if config is not None:
            raise BaseModelError(f"preset {source!r} takes no config folder (config={config!r}).", value=config,
                                 fix="drop config")
        preset = presets.get_preset(source)
        return BaseIdentity(name, "preset", preset.arch, torch_dtype, torch_device, preset.fingerprint)
    path = Path(source)
    if path.is_dir():
        if config is not None:
            raise BaseModelError(
                f"{path} is a diffusers folder and carries its own configs; config={config!r} is only for "
                "single-file checkpoints.", value=config, fix="drop config"
            )
        arch = arch_mod.detect_folder_arch(path)
        _check_weights_of(path)
        digest = file_fingerprint(path)
        _check_folder(path, digest)
        return BaseIdentity(name, "folder", arch, torch_dtype, torch_device, f"folder:sha256:{digest}")
    if path.is_file():
        arch, config = _check_single_file(path, config)
        checks.check_weights(path)  # hashes as it checks: file_fingerprint(path) reads nothing again
        digest = f"single-file:sha256:{file_fingerprint(path)}+config:sha256:{file_fingerprint(config)}"
        return BaseIdentity(name, "single-file", arch, torch_dtype, torch_device, digest, config)
    raise BaseModelError(
        f"{name!r} is neither a preset ({', '.join(presets.PRESETS)}) nor an existing file or folder.",
        value=name, limit=list(presets.PRESETS), kind="not_found",
        fix="give a preset name, a diffusers folder or a .safetensors checkpoint path"
    )


def load_base(
    source: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    config: str | Path | None = None,
) -> LoadedBase:
    """Load a base model, offline.

    source: a preset name (see presets.PRESETS), a diffusers folder (model_index.json inside), or a
        single-file .safetensors checkpoint in the original SD1.5 / SDXL layout.
    config: for a single file only, the local folder with model_index.json, component configs and
        tokenizers (a diffusers folder of the same architecture, or a config skeleton).
    dtype: "auto" | "fp32" | "fp16" | "bf16"; device: "auto" | "cpu" | "cuda" | "cuda:N".
        "auto" means cuda + fp16 when CUDA is available, else cpu + fp32.
    """
    identity = identify_base(source, dtype, device, config)
    if identity.kind == "preset":
        pipe = presets.build_pipeline(identity.source, dtype=identity.dtype, device=identity.device)
        return LoadedBase(pipe, identity.arch, identity.dtype, identity.device, identity.fingerprint, identity.source)
    cls = _pipeline_class(identity.arch)
    common = {"dtype": identity.dtype, "local_files_only": True, **_extra_kwargs(identity.arch)}
    # Every value of every weights file is checked before diffusers opens it (remembered per file
    # state, so a base evicted from the pool and loaded again is not read through twice).
    if identity.kind == "folder":
        checked = _check_folder(Path(identity.source), file_fingerprint(identity.source))
        weights = [header.path for header in checked.headers]
    else:
        weights = [Path(identity.source)]
    scanned = [checks.check_weights(path) for path in weights]
    try:
        if identity.kind == "folder":
            pipe = cls.from_pretrained(identity.source, use_safetensors=True, **common)
        else:
            pipe = cls.from_single_file(identity.source, config=str(identity.config), **common)
    except Exception as exc:  # what the checks above could not foresee: the library's own words, as ours
        raise BaseModelError(f"diffusers could not load this base: {type(exc).__name__}: {str(exc)[:500]}",
                             file=identity.source, value=type(exc).__name__, kind="load_failed") from None
    checks.unchanged_since_checked(scanned)
    # Loaders may return a subclass or a variant; the pipeline must agree with what the files said.
    loaded_arch = arch_mod.detect_pipeline_arch(pipe)
    if loaded_arch != identity.arch:
        raise BaseModelError(f"{identity.source}: files describe {identity.arch} but diffusers built a {loaded_arch} "
                             "pipeline", value=loaded_arch, limit=identity.arch)
    pipe = pipe.to(identity.device)
    _own_memory(pipe)
    pipe.set_progress_bar_config(disable=True)  # progress goes through the runtime's events
    return LoadedBase(pipe, identity.arch, identity.dtype, identity.device, identity.fingerprint, identity.source)
