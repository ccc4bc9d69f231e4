"""Tell SD1.5, SDXL, Flux and SD3.5 apart: from a live pipeline, a diffusers folder's configs, or a
single-file checkpoint's key names (read from the safetensors header, no tensor loaded).

Only the architectures LoRA Loom supports are named; anything else (SD2, refiner, inpainting, Flux
Fill / Depth / Kontext, non-SD pipelines) raises a ValueError that says what was found.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from ..graph_runtime.errors import LoomError
from ..lora.arches import ARCH_NAMES as ARCHES
from ..lora.arches import ARCHES as _DESCRIPTIONS


class BaseModelError(LoomError, ValueError):
    """A base model (preset, diffusers folder, single-file checkpoint, dtype or device) that cannot be
    used as given. Also a ValueError, as these were before the error family existed."""


PIPELINE_CLASSES = {name: arch.pipeline_class for name, arch in _DESCRIPTIONS.items()}
# transformer model class -> (architecture, the in_channels of its text-to-image models: Flux packs
# 2x2 patches of 16 latent channels; Fill (384) and Depth / Canny (128) take extra image channels)
_TRANSFORMERS = {arch.denoiser_class: name for name, arch in _DESCRIPTIONS.items() if arch.denoiser == "transformer"}
_TRANSFORMER_IN_CHANNELS = {"flux": 64, "sd3": 16}

# Where the original single-file layouts keep each part (read by detection here, written by ldm_keys).
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."  # a single file's VAE, under LDM names
TEXT_PREFIXES = {
    # HF CLIP layout kept as is under these prefixes (convert_ldm_clip_checkpoint strips them)
    ("sd15", "text_encoder"): "cond_stage_model.transformer.text_model.",
    ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.text_model.",
}
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's second encoder, OpenCLIP layout
# Key names that only one layout has (the same ones diffusers' single-file loader checks).
SD15_TEXT_KEY = TEXT_PREFIXES[("sd15", "text_encoder")] + "embeddings.position_embedding.weight"
SDXL_TEXT_KEY = OPEN_CLIP_PREFIX + "positional_embedding"
_SD2_TEXT_PREFIX = "cond_stage_model.model."
_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."


def arch_from_unet_config(unet_config: Mapping[str, Any], where: str) -> str:
    """Architecture implied by a UNet2DConditionModel config; `where` names its source in errors."""
    if unet_config.get("in_channels", 4) != 4:
        raise BaseModelError(
            f"{where}: UNet has in_channels {unet_config.get('in_channels')} (inpainting or another "
            "variant); only plain text-to-image SD1.5 and SDXL (in_channels 4) are supported"
        )
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("addition_embed_type") is None and not unet_config.get("use_linear_projection"):
        return "sd15"
    raise BaseModelError(
        f"{where}: UNet config is neither SD1.5 (conv proj_in, no added embedding) nor SDXL "
        f"(addition_embed_type 'text_time'): addition_embed_type={unet_config.get('addition_embed_type')!r}, "
        f"use_linear_projection={unet_config.get('use_linear_projection')!r} (SD2 uses linear "
        f"projection and is not supported); supported architectures: {', '.join(ARCHES)}"
    )


def arch_from_transformer_config(class_name: str | None, config: Mapping[str, Any], where: str) -> str:
    """Architecture implied by a transformer denoiser's class name and config; `where` names its source."""
    arch = _TRANSFORMERS.get(class_name)
    if arch is None:
        raise BaseModelError(
            f"{where}: transformer class {class_name!r} is not supported; supported: "
            + ", ".join(f"{c} ({_DESCRIPTIONS[a].label})" for c, a in _TRANSFORMERS.items()),
            value=class_name, limit=tuple(_TRANSFORMERS), kind="unsupported_arch")
    expected = _TRANSFORMER_IN_CHANNELS[arch]
    if config.get("in_channels") != expected:
        raise BaseModelError(
            f"{where}: {class_name} has in_channels {config.get('in_channels')} (Fill, Depth, Canny or another "
            f"variant that takes extra image channels); only plain text-to-image {_DESCRIPTIONS[arch].label} "
            f"(in_channels {expected}) is supported", value=config.get("in_channels"), limit=expected,
            kind="unsupported_arch")
    return arch


def _check_class(class_name: str | None, arch: str, where: str, bases: Iterable[str] = ()) -> str:
    # `bases` lets subclasses of the pipeline classes (img2img variants, community pipelines) pass.
    if PIPELINE_CLASSES[arch] != class_name and PIPELINE_CLASSES[arch] not in set(bases):
        raise BaseModelError(
            f"{where}: pipeline class {class_name!r} does not match its {arch} "
            f"{'UNet' if _DESCRIPTIONS[arch].denoiser == 'unet' else _DESCRIPTIONS[arch].denoiser_class}; expected "
            f"{PIPELINE_CLASSES[arch]!r}. Supported: "
            + ", ".join(f"{a} ({c})" for a, c in PIPELINE_CLASSES.items())
        )
    return arch


def detect_pipeline_arch(pipe) -> str:
    """"sd15", "sdxl", "flux" or "sd3" for a live diffusers pipeline (its class and its denoiser's
    class and config must agree)."""
    where = f"pipeline {type(pipe).__name__}"
    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    if unet is not None:
        arch = arch_from_unet_config(dict(unet.config), where)
    elif transformer is not None:
        arch = arch_from_transformer_config(type(transformer).__name__, dict(transformer.config), where)
    else:
        raise BaseModelError(f"{where} has no UNet or transformer; supported: " + ", ".join(PIPELINE_CLASSES.values()))
    return _check_class(type(pipe).__name__, arch, where, [cls.__name__ for cls in type(pipe).__mro__])


MAX_CONFIG_JSON_BYTES = 1 * 2**20  # a config.json or model_index.json is a few kB


def read_config(path: Path, what: str, max_bytes: int = MAX_CONFIG_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from a base model's folder, read as strictly as a workflow (graph_runtime's
    reader: a regular file, size-capped before reading; no NaN, duplicate keys or deep nesting);
    `what` says what the file is for, in the error when it is missing."""
    from ..graph_runtime.files import FileError, read_capped
    from ..graph_runtime.jsonio import loads_strict

    if not path.exists() and not path.is_symlink():
        raise BaseModelError(
            f"{path.parent}: no {path.name}; expected a diffusers folder ({what}).", value=str(path),
            kind="not_found", fix="point at the folder that save_pretrained wrote (it holds model_index.json and "
                                  "unet/config.json or transformer/config.json)"
        )
    try:
        value = loads_strict(read_capped(path, max_bytes, "config file"), source=str(path), max_bytes=max_bytes)
    except (FileError, LoomError) as exc:
        # loads_strict names its source in the message too; the file field names it once.
        raise BaseModelError(exc.message.removeprefix(f"{path}: "), file=exc.file or path, key=exc.key,
                             value=exc.value, limit=exc.limit, fix=exc.fix, kind=exc.kind) from None
    if not isinstance(value, dict):
        raise BaseModelError(f"a config file holds a JSON object, not {type(value).__name__}.", file=path,
                             value=type(value).__name__, limit="object")
    return value


def detect_folder_arch(folder: str | Path) -> str:
    """"sd15", "sdxl", "flux" or "sd3" for a diffusers folder or config skeleton, from
    model_index.json and the denoiser's config.json (unet/ or transformer/) only (no weights read)."""
    folder = Path(folder)
    index = read_config(folder / "model_index.json", "model_index.json names the pipeline class")
    if "transformer" in index and "unet" not in index:
        config = read_config(folder / "transformer" / "config.json", "transformer/config.json describes the transformer")
        arch = arch_from_transformer_config(config.get("_class_name"), config, str(folder))
    else:
        unet_config = read_config(folder / "unet" / "config.json", "unet/config.json describes the UNet")
        arch = arch_from_unet_config(unet_config, str(folder))
    return _check_class(index.get("_class_name"), arch, str(folder))


SINGLE_FILE_ARCHES = ("sd15", "sdxl")  # the architectures whose LDM / SGM single-file layout bases.ldm_keys writes
# Block names of the original DiT layouts (BFL / ComfyUI Flux, SD3's MMDiT), bare or under UNET_PREFIX.
_DIT_BLOCKS = {"double_blocks.": "flux", "single_blocks.": "flux", "joint_blocks.": "sd3"}


def _dit_checkpoint(keys: set[str]) -> str | None:
    for key in keys:
        bare = key.removeprefix(UNET_PREFIX)
        for block, arch in _DIT_BLOCKS.items():
            if bare.startswith(block):
                return arch
    return None


def detect_checkpoint_arch(keys: Iterable[str], where: str) -> str:
    """"sd15", "sdxl", "flux" or "sd3" from the key names of an original-layout single-file
    checkpoint (LDM / SGM for the UNets; BFL / ComfyUI / MMDiT block names for the transformers,
    whose files hold the transformer alone)."""
    keys = set(keys)
    dit = _dit_checkpoint(keys)
    if dit is not None:
        return dit
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        sample = ", ".join(sorted(keys)[:3])
        raise BaseModelError(
            f"{where}: no '{UNET_PREFIX}*' keys, so this is not a full SD/SDXL single-file checkpoint, and no "
            f"{', '.join(repr(b + 'N.') for b in _DIT_BLOCKS)} keys, so not a Flux / SD3.5 transformer either "
            f"(first keys: {sample}). A LoRA or a diffusers-format weights file?", value=sample,
            fix="load a diffusers folder by its directory, or a complete original-layout .safetensors checkpoint"
        )
    if SDXL_TEXT_KEY in keys:
        return "sdxl"
    if SD15_TEXT_KEY in keys:
        return "sd15"
    if any(k.startswith(_SD2_TEXT_PREFIX) for k in keys):
        found = "SD2 (OpenCLIP text encoder under cond_stage_model.model.)"
    elif any(k.startswith(_REFINER_TEXT_PREFIX) for k in keys):
        found = "an SDXL refiner (single OpenCLIP encoder)"
    else:
        found = "no known text encoder keys"
    raise BaseModelError(
        f"{where}: found {found}; expected SD1.5 ('{SD15_TEXT_KEY}') or SDXL ('{SDXL_TEXT_KEY}'). "
        f"Supported architectures: {', '.join(SINGLE_FILE_ARCHES)}"
    )


def detect_file_arch(path: str | Path) -> str:
    """"sd15", "sdxl", "flux" or "sd3" for a single-file .safetensors checkpoint, reading only its header (checked
    as strictly as a LoRA's: see bases.checks)."""
    from .checks import weights_header

    return detect_checkpoint_arch(weights_header(path).tensors, str(path))
