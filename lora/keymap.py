"""Module names: kohya (diffusers-style and SGM/LDM) <-> diffusers module paths.

Reading kohya names goes through diffusers' own converters (`_maybe_map_sgm_blocks_to_diffusers`,
`_convert_non_diffusers_lora_to_diffusers`, then `convert_unet_state_dict_to_peft` /
`convert_state_dict_to_peft`). We feed them placeholder tensors, one per module, so they only map
names: alphas, tensors and dtypes stay ours. Three of their mistakes are worked around here, each
checked by tests over every module of the tiny SD1.5 and SDXL presets:

1. `_maybe_map_sgm_blocks_to_diffusers` groups keys by substring, so ``input_blocks_1`` also takes
   ``input_blocks_10`` / ``_11`` (SD1.5 has 12 input and output blocks) and then fails with a
   KeyError. We call it once per SGM block.
2. It maps an up block's upsampler at inner index 1 to ``attentions`` (SD1.5's first up block has
   no attentions, so its upsampler is ``output_blocks_2_1_conv``). An attention never has a direct
   ``conv`` child, so ``output_blocks_N_1_conv`` is renamed to ``output_blocks_N_2_conv`` first.
3. `_convert_unet_lora_key` strips the index of SDXL's ``add_embedding_linear_1`` / ``_2`` (both
   become ``add.embedding.linear``: one silently overwrites the other). We rename them to their
   SGM spelling ``label_emb_0_0`` / ``label_emb_0_2``, which it maps right.

Writing needs the reverse, which diffusers does not have (its `convert_state_dict_to_kohya` writes
alpha = rank, ``lora_te1_`` on SD1.5 and no ``text_model_``): `kohya_module_name` builds it, with
`diffusers_to_sgm` for the SGM block layout kohya uses for SDXL.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

import torch

from .arches import ARCHES
from .canonical import TEXT_ENCODERS
from .errors import LoRAFormatError

KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}
"""kohya module-name prefix -> component."""

TEXT_MODEL = "text_model."
_TE_TOP_LEVEL = ("text_projection",)  # CLIPTextModelWithProjection modules outside text_model
_T5_PATHS = ("encoder.block.", "encoder.final_layer_norm", "shared")  # T5EncoderModel has no text_model

_SGM_BLOCK = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")
_SGM_UPSAMPLER_AT_1 = re.compile(r"^(lora_unet_output_blocks_\d+)_1_conv$")
_ADD_EMBEDDING = {
    "lora_unet_add_embedding_linear_1": "lora_unet_label_emb_0_0",
    "lora_unet_add_embedding_linear_2": "lora_unet_label_emb_0_2",
}


@dataclass(frozen=True)
class UNetLayout:
    """What the SGM block numbering depends on: resnets per block and which up blocks have attentions."""

    layers_per_block: int
    up_has_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "UNetLayout":
        """Layout of a UNet2DConditionModel config (dict or FrozenDict)."""
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        return cls(int(get("layers_per_block", 2)), tuple("CrossAttn" in t for t in get("up_block_types")))


LAYOUTS = {name: UNetLayout(arch.layers_per_block, arch.up_attention) for name, arch in ARCHES.items()
           if arch.denoiser == "unet"}


def normalize_te_path(path: str) -> str:
    """Canonical text-encoder module path: without the ``text_model.`` prefix."""
    return path[len(TEXT_MODEL) :] if path.startswith(TEXT_MODEL) else path


def te_model_path(path: str, has_text_model: bool) -> str:
    """The module name a live text encoder uses for canonical `path` (adds ``text_model.`` back
    when the model has that submodule and the module lives under it)."""
    if has_text_model and path not in _TE_TOP_LEVEL and not path.startswith(_T5_PATHS):
        return TEXT_MODEL + path
    return path


_RESNET_TO_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}
_TOP_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def diffusers_to_sgm(path: str, layout: UNetLayout) -> str:
    """The SGM/LDM name (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``) of a diffusers UNet
    module path, for the block layout `layout`. Raises LoRAFormatError for paths with no SGM name."""
    if path in _TOP_TO_SGM:
        return _TOP_TO_SGM[path]
    parts = path.split(".")
    per = layout.layers_per_block + 1
    try:
        if parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets":
                return _under(f"middle_block.{2 * j}", _resnet_rest(rest))
            if kind == "attentions" and j == 0:
                return _under("middle_block.1", rest)
        elif parts[0] in ("down_blocks", "up_blocks"):
            block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if parts[0] == "down_blocks":
                if kind == "resnets":
                    return _under(f"input_blocks.{1 + block * per + j}.0", _resnet_rest(rest))
                if kind == "attentions":
                    return _under(f"input_blocks.{1 + block * per + j}.1", rest)
                if kind == "downsamplers" and rest == ["conv"]:
                    return f"input_blocks.{(block + 1) * per}.0.op"
            else:
                if kind == "resnets":
                    return _under(f"output_blocks.{block * per + j}.0", _resnet_rest(rest))
                if kind == "attentions":
                    return _under(f"output_blocks.{block * per + j}.1", rest)
                if kind == "upsamplers" and rest == ["conv"]:
                    inner = 2 if layout.up_has_attention[block] else 1
                    return f"output_blocks.{block * per + layout.layers_per_block}.{inner}.conv"
    except (IndexError, ValueError):
        pass
    raise LoRAFormatError(
        f"UNet module {path!r} has no SGM/LDM name in layout {layout}",
        key=path,
        fix="write it with unet_names='diffusers'.",
    )


def _under(block: str, rest: list[str]) -> str:
    # `rest` is empty for the block module itself (e.g. "down_blocks.0.attentions.0")
    return ".".join([block, *rest])


def _resnet_rest(rest: list[str]) -> list[str]:
    return [_RESNET_TO_SGM.get(rest[0], rest[0]), *rest[1:]] if rest else []


def kohya_module_name(component: str, path: str, *, te_prefix: str = "lora_te_", sgm_layout: UNetLayout | None = None) -> str:
    """kohya name of a canonical module: ``lora_unet_down_blocks_0_...`` (or SGM names when
    `sgm_layout` is given), ``lora_te_text_model_encoder_...`` with `te_prefix` for text_encoder,
    ``lora_te2_...`` / ``lora_te3_...`` for text_encoder_2 / _3 (T5 paths without ``text_model_``)."""
    if component == "unet":
        name = diffusers_to_sgm(path, sgm_layout) if sgm_layout is not None else path
        return "lora_unet_" + name.replace(".", "_")
    prefix = {"text_encoder": te_prefix, "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}[component]
    return prefix + te_model_path(path, True).replace(".", "_")


def is_sgm_name(name: str) -> bool:
    """True for kohya UNet names in SGM/LDM block numbering."""
    return bool(_SGM_BLOCK.match(name))


def _fix_for_diffusers(name: str) -> str:
    # Workarounds 2 and 3 of the module docstring: rename to spellings diffusers maps right.
    if name in _ADD_EMBEDDING:
        return _ADD_EMBEDDING[name]
    m = _SGM_UPSAMPLER_AT_1.match(name)
    if m:
        return f"{m.group(1)}_2_conv"
    return name


def kohya_names_to_paths(
    names: Iterable[str], *, layers_per_block: int = 2, path: str | None = None
) -> dict[str, tuple[str, str]]:
    """Map kohya module names (``lora_unet_input_blocks_4_1_...``, ``lora_te1_text_model_...``) to
    (component, canonical module path), using diffusers' converters plus the fixes above.

    `layers_per_block` sets the SGM block numbering (2 for SD1.x, SD2 and SDXL). Names diffusers
    cannot map, and two names mapping to one module, raise LoRAFormatError naming the key.
    """
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    names = list(names)
    for name in names:
        if not name.startswith(tuple(KOHYA_PREFIXES)):
            raise LoRAFormatError(
                f"key {name!r} is not a kohya module name (expected one of {', '.join(KOHYA_PREFIXES)})",
                path=path,
                key=name,
                limit=tuple(KOHYA_PREFIXES),
            )
    # One placeholder pair per module: the converters move tensors around, the value tells us which
    # input name became which output key.
    placeholders: dict[str, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(names):
        fixed = _fix_for_diffusers(name)
        m = _SGM_BLOCK.match(fixed)
        group = f"{m.group(1)}_{m.group(2)}" if m and fixed != "lora_unet_input_blocks_0_0" else ""
        tag = torch.tensor(float(index))
        placeholders.setdefault(group, {}).update(
            {f"{fixed}.lora_down.weight": tag, f"{fixed}.lora_up.weight": tag}
        )
    unet_config = SimpleNamespace(layers_per_block=layers_per_block)
    merged: dict[str, torch.Tensor] = {}
    try:
        for group, part in placeholders.items():
            merged.update(_maybe_map_sgm_blocks_to_diffusers(part, unet_config) if group else part)
        converted, _ = _convert_non_diffusers_lora_to_diffusers(merged)
    except (KeyError, ValueError, IndexError) as exc:
        raise LoRAFormatError(
            f"diffusers' kohya converter cannot map these module names: {exc}", path=path, key=str(exc)[:200]
        ) from None
    found: dict[int, tuple[str, str]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for module_path, index in _peft_module_paths(converted, component).items():
            if index in found:
                continue
            found[index] = (component, module_path)
    result: dict[str, tuple[str, str]] = {}
    seen: dict[tuple[str, str], str] = {}
    for index, name in enumerate(names):
        if index not in found:
            raise LoRAFormatError(
                f"kohya module {name!r}: diffusers' converter gave it no module path", path=path, key=name
            )
        target = found[index]
        if target in seen:
            raise LoRAFormatError(
                f"kohya modules {seen[target]!r} and {name!r} both map to {target[0]}.{target[1]}",
                path=path,
                key=name,
                value=target,
            )
        seen[target] = name
        result[name] = target
    return result


def _to_peft_names(part: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    # diffusers' own renames. For text encoders it guesses the dict's type from its keys and fails
    # on dicts that hold only q_proj or only text_projection; the types are given explicitly here,
    # which is safe because each mapping leaves keys of the other forms alone.
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component == "unet":
        return convert_unet_state_dict_to_peft(part)
    part = convert_state_dict_to_diffusers(part, original_type=StateDictType.DIFFUSERS_OLD)
    return convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS)


def _peft_module_paths(converted: Mapping[str, torch.Tensor], component: str) -> dict[str, int]:
    part = {k[len(component) + 1 :]: v for k, v in converted.items() if k.startswith(component + ".")}
    if not part:
        return {}
    part = _to_peft_names(part, component)
    out = {}
    for key, tag in part.items():
        if key.endswith(".lora_A.weight"):
            module_path = key[: -len(".lora_A.weight")]
            if component in TEXT_ENCODERS:
                module_path = normalize_te_path(module_path)
            out[module_path] = int(tag.item())
    return out


def rename_with_diffusers(keys: Iterable[str], component: str) -> dict[str, str]:
    """Map legacy diffusers key names (``attn1.processor.to_q_lora.down.weight``,
    ``mlp.fc1.lora_linear_layer.up.weight``, ``.lora.down.weight``) of one component to peft names
    (``attn1.to_q.lora_A.weight``) with diffusers' own converters; keys they leave alone map to
    themselves."""
    keys = list(keys)
    out = _to_peft_names({k: torch.tensor(float(i)) for i, k in enumerate(keys)}, component)
    return {keys[int(v.item())]: k for k, v in out.items()}
