"""Rename a diffusers pipeline's weights to the original single-file layout (LDM for SD1.5, SGM for
SDXL), as checkpoints from the wild have them.

diffusers 0.42 ships only the other direction (`loaders/single_file_utils.py`:
convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
convert_open_clip_checkpoint). This module is its exact inverse, written block by block from those
functions; the tests prove it by loading the written file back with `from_single_file` and comparing
every tensor bit for bit. A key with no known original name raises rather than being dropped, so a
silently partial checkpoint cannot be written.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..lora.errors import LoRAFormatError
from ..lora.keymap import UNetLayout, diffusers_to_sgm
from .arch import OPEN_CLIP_PREFIX, SINGLE_FILE_ARCHES, TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, BaseModelError

_DIFFUSERS_INSTEAD = "save this pipeline as a diffusers folder instead"


def _unmapped(message: str, key: str) -> BaseModelError:
    """A weight this converter has no original name for (never dropped: the checkpoint would be partial)."""
    return BaseModelError(message, key=key, value=key, limit="the SD1.5 and SDXL layouts", fix=_DIFFUSERS_INSTEAD,
                          kind="no_original_name")

_VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
_VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
_OPEN_CLIP_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)


class _PrefixMap:
    """diffusers prefix -> (original prefix, renames applied to the rest of the key)."""

    def __init__(self, component: str):
        self.component = component
        self.entries: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {}

    def add(self, diffusers: str, original: str, renames: tuple[tuple[str, str], ...] = ()) -> None:
        self.entries[diffusers + "."] = (original + ".", renames)

    def rename(self, key: str) -> str:
        # Prefixes end with "." so "resnets.1." never captures "resnets.10."; at most one matches.
        for prefix, (original, renames) in self.entries.items():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                for old, new in renames:
                    if rest.startswith(old):
                        rest = new + rest[len(old):]
                        break
                return original + rest
        raise _unmapped(f"{self.component} key {key!r} has no original single-file name; this converter knows "
                        "SD1.5 and SDXL layouts only.", key)


def original_unet_key(key: str, config: Mapping[str, Any]) -> str:
    """The original name (no "model.diffusion_model." prefix) of one diffusers UNet key or module
    path, e.g. on SDXL "down_blocks.1.attentions.0.proj_in" -> "input_blocks.4.1.proj_in" and
    "down_blocks.0.resnets.1.conv1" -> "input_blocks.2.0.in_layers.2". The block numbering is
    `lora.keymap.diffusers_to_sgm`'s, the one kohya LoRA names use too."""
    layout = UNetLayout.from_config(config)
    try:
        return diffusers_to_sgm(key, layout)
    except LoRAFormatError:
        pass
    module, _, param = key.rpartition(".")  # a parameter key: map its module, keep the leaf
    try:
        return f"{diffusers_to_sgm(module, layout)}.{param}" if module else diffusers_to_sgm(key, layout)
    except LoRAFormatError:
        raise _unmapped(f"UNet key {key!r} has no original single-file name; this converter knows SD1.5 and SDXL "
                        "layouts only.", key) from None


def unet_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict under original names ("model.diffusion_model.*")."""
    return {UNET_PREFIX + original_unet_key(key, config): value for key, value in state_dict.items()}


def _vae_map(config: Mapping[str, Any]) -> _PrefixMap:
    m = _PrefixMap("VAE")
    for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv", "post_quant_conv"):
        m.add(name, name)
    for side in ("encoder", "decoder"):
        m.add(f"{side}.conv_norm_out", f"{side}.norm_out")
        m.add(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION)
        for k in range(2):
            m.add(f"{side}.mid_block.resnets.{k}", f"{side}.mid.block_{k + 1}", _VAE_RESNET)
    layers = config["layers_per_block"]
    for i in range(len(config["down_block_types"])):
        for j in range(layers):
            m.add(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        m.add(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
    count = len(config["up_block_types"])
    for i in range(count):
        level = count - 1 - i  # the original decoder numbers its levels from the bottom up
        for j in range(layers + 1):
            m.add(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        m.add(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    return m


def vae_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under original names ("first_stage_model.*").

    The original mid-block attention uses 1x1 convolutions, so its q/k/v/proj_out weights get two
    trailing unit dimensions back (diffusers drops them when loading).
    """
    m = _vae_map(config)
    out = {}
    for key, value in state_dict.items():
        name = m.rename(key)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + name] = value
    return out


def clip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict under an original CLIP-L prefix.

    transformers 5 flattened CLIPTextModel (no `text_model.` level); older versions had it. Both
    give the same original names.
    """
    return {prefix + key.removeprefix("text_model."): value for key, value in state_dict.items()}


def open_clip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP layout (SDXL's second text encoder).

    OpenCLIP keeps q, k and v as one `in_proj` tensor (q rows first) and applies the projection as
    `x @ text_projection`, so the HF Linear weight is stored transposed.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer_prefix = "encoder.layers."
    for key, value in state_dict.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        name = key.removeprefix("text_model.")
        if name in fixed:
            out[prefix + fixed[name]] = value
            continue
        if not name.startswith(layer_prefix):
            raise _unmapped(f"text_encoder_2 key {key!r} has no OpenCLIP name.", key)
        index, rest = name[len(layer_prefix):].split(".", 1)
        block = f"{prefix}transformer.resblocks.{index}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            _, proj, kind = rest.split(".")
            qkv.setdefault(f"{block}attn.in_proj_{kind}", {})[proj] = value
            continue
        for old, new in _OPEN_CLIP_LAYER:
            if rest.startswith(old):
                out[block + new + rest[len(old):]] = value
                break
        else:
            raise _unmapped(f"text_encoder_2 key {key!r} has no OpenCLIP name.", key)
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def pipeline_to_original(pipe, arch: str) -> dict[str, torch.Tensor]:
    """All weights of an SD1.5 or SDXL pipeline under the original single-file names, as one dict.

    Tensors are made contiguous CPU copies so the dict can be handed straight to safetensors.
    """
    if arch not in SINGLE_FILE_ARCHES:
        raise BaseModelError(f"architecture {arch!r}: single-file layout known for {', '.join(SINGLE_FILE_ARCHES)}.",
                             value=arch, limit=SINGLE_FILE_ARCHES, fix=_DIFFUSERS_INSTEAD, kind="unsupported_arch")
    out = unet_to_original(pipe.unet.state_dict(), pipe.unet.config)
    out.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    out.update(clip_to_original(pipe.text_encoder.state_dict(), TEXT_PREFIXES[(arch, "text_encoder")]))
    if arch == "sdxl":
        out.update(open_clip_to_original(pipe.text_encoder_2.state_dict()))
    return {key: value.detach().to("cpu").contiguous() for key, value in out.items()}
