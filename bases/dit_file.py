"""A Flux or SD3.5 transformer's weights in the original single-file layout (Black Forest Labs'
``double_blocks.N.img_attn.qkv`` / ``single_blocks.N.linear1``, Stability's
``joint_blocks.N.x_block.attn.qkv``; bare, as flux1-dev.safetensors ships, or under ComfyUI's
``model.diffusion_model.``) <-> diffusers' FluxTransformer2DModel / SD3Transformer2DModel keys.

Both directions are ours, built on lora/dit_keys' module tables (the same ones LoRA files are read
with), because diffusers 0.42's ``convert_flux_transformer_checkpoint_to_diffusers`` hard-codes the
real model's width (inner_dim 3072) when it splits ``linear1``, so it cannot read any other width,
and diffusers has no writer at all. Fused projections split and re-fuse by output rows, and the
final layer's (shift, scale) halves swap: slicing and concatenation only, so both directions are
bit-exact. A key with no counterpart raises rather than being dropped.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from ..lora import dit_keys
from .arch import UNET_PREFIX, VAE_PREFIX, BaseModelError

# Parameters that are not weights of a (possibly fused) linear: the q/k RMS norms and SD3's
# positional table, original inner name -> diffusers inner name, per block list ("" = top level).
_PARAMS: dict[str, dict[str, dict[str, str]]] = {
    "flux": {
        "double_blocks": {
            "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
            "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
            "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
            "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
        },
        "single_blocks": {
            "norm.query_norm.scale": "attn.norm_q.weight",
            "norm.key_norm.scale": "attn.norm_k.weight",
        },
        "": {},
    },
    "sd3": {
        "joint_blocks": {
            "x_block.attn.ln_q.weight": "attn.norm_q.weight",
            "x_block.attn.ln_k.weight": "attn.norm_k.weight",
            "context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
            "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
            "x_block.attn2.ln_q.weight": "attn2.norm_q.weight",
            "x_block.attn2.ln_k.weight": "attn2.norm_k.weight",
        },
        "": {"pos_embed": "pos_embed.pos_embed"},
    },
}
_BLOCK = re.compile(r"^(double_blocks|single_blocks|joint_blocks)\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_REVERSE_PARAMS = {arch: {dit_keys.DIFFUSERS_BLOCKS.get(b, ""): (b, {v: k for k, v in table.items()})
                          for b, table in tables.items()} for arch, tables in _PARAMS.items()}  # fmt: skip


def _unknown(key: str, arch: str, direction: str, where: str | None = None) -> BaseModelError:
    return BaseModelError(
        f"transformer key {key!r} has no {direction} name in the {arch} layout this converter knows; it is "
        "refused rather than dropped (the model would be partial).", file=where, key=key, value=key,
        kind="no_original_name", fix="check that the file is a plain text-to-image Flux / SD3.5 transformer")


def _renamed_param(bare: str, arch: str) -> str | None:
    m = _BLOCK.match(bare)
    if m:
        blocks, index, inner = m.groups()
        new = _PARAMS[arch].get(blocks, {}).get(inner)
        return None if new is None else f"{dit_keys.DIFFUSERS_BLOCKS[blocks]}.{index}.{new}"
    return _PARAMS[arch][""].get(bare)


def _segment_rows(target: dit_keys.Target, unit: int, height: int) -> list[tuple[int, int]]:
    """Original rows (start, stop) a diffusers tensor of `height` rows takes, in its row order."""
    rows, left = [], height
    for start, stop in target.segments:
        size = left if stop is None else (stop - start) * unit
        rows.append((start * unit, start * unit + size))
        left -= size
    return rows


# Where all-in-one files (ComfyUI's flux1-dev-fp8, SD3 files with clips / VAE) keep the other parts.
_OTHER_PARTS = {VAE_PREFIX: "VAE", "vae.": "VAE", "text_encoders.": "text encoder",
                "cond_stage_model.": "text encoder", "conditioner.": "text encoder"}


def _refuse_other_parts(keys, where: str) -> None:
    for key in sorted(keys):
        part = next((what for prefix, what in _OTHER_PARTS.items() if key.startswith(prefix)), None)
        if part is not None:
            raise BaseModelError(
                f"{where}: holds {part} weights besides the transformer (e.g. {key!r}); from a Flux / SD3.5 "
                "single file only the transformer is read so far, and nothing is dropped silently.", file=where,
                key=key, value=part, limit="the transformer alone", kind="unsupported_layout",
                fix="use the transformer-only file (ComfyUI: the diffusion model) and pass a diffusers folder with "
                    "the text encoders and VAE as config")


def to_diffusers(tensors: Mapping[str, torch.Tensor], arch: str, where: str) -> dict[str, torch.Tensor]:
    """The diffusers transformer state dict of an original-layout one (keys bare or under
    ``model.diffusion_model.``); `where` names the file in errors. Values are the given tensors or
    row ranges of them (views: a row range of a row-major tensor is contiguous, so a fused weight's
    memory is shared, not held twice), new tensors only where rows are reordered."""
    _refuse_other_parts(tensors, where)
    bare = {key.removeprefix(UNET_PREFIX): value for key, value in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in bare.items():
        renamed = _renamed_param(key, arch)
        if renamed is not None:
            out[renamed] = value
            continue
        name, _, param = key.rpartition(".")
        found = dit_keys.original_targets(name, arch) if param in ("weight", "bias") else None
        weight = bare.get(f"{name}.weight")
        if found is None or weight is None:
            raise _unknown(key, arch, "diffusers", where)
        targets = dit_keys.targets_for(name, found[1], weight.shape)
        if len(targets) == 1 and targets[0].segments == dit_keys.WHOLE:
            out[f"{targets[0].path}.{param}"] = value
            continue
        unit, total = int(weight.shape[1]), int(weight.shape[0])
        try:
            dit_keys.check_tiling(targets, weight.shape, key)
        except ValueError as exc:
            raise BaseModelError(f"{where}: {exc}", file=where, key=key, value=total, kind="bad_shape") from None
        for target in targets:
            rows = [(a * unit, total if b is None else b * unit) for a, b in target.segments]
            out[f"{target.path}.{param}"] = value[rows[0][0]:rows[0][1]] if len(rows) == 1 else \
                torch.cat([value[a:b] for a, b in rows])
    return out


def to_original(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The original-layout (bare BFL / MMDiT names) state dict of a diffusers transformer state dict:
    the exact inverse of `to_diffusers`."""
    fused: dict[tuple[str, str], list[tuple[dit_keys.Target, torch.Tensor, int]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _DIFFUSERS_BLOCK.match(key)
        blocks, table = _REVERSE_PARAMS[arch].get(m.group(1) if m else "", (None, {}))
        inner = m.group(3) if m else key
        if inner in table:
            out[f"{blocks}.{m.group(2)}.{table[inner]}" if m else table[inner]] = value
            continue
        path, _, param = key.rpartition(".")
        found = dit_keys.diffusers_to_original(path, arch) if param in ("weight", "bias") else None
        if found is None:
            raise _unknown(key, arch, "original")
        name, targets = found
        unit = int(state[f"{path}.weight"].shape[1])
        target = next(t for t in targets if t.path == path)
        fused.setdefault((name, param), []).append((target, value, unit))
    for (name, param), parts in fused.items():
        found = dit_keys.original_targets(name, arch)
        expected = {t.path for t in found[1]}
        if {t.path for t, _, _ in parts} != expected:
            missing = sorted(expected - {t.path for t, _, _ in parts})
            raise BaseModelError(f"original module {name!r} is fused from {sorted(expected)}; the model lacks "
                                 f"{missing}.", key=name, value=missing, kind="no_original_name")
        height = sum(int(v.shape[0]) for _, v, _ in parts)
        unit = parts[0][2]
        targets = dit_keys.targets_for(name, found[1], (height, unit))
        if len(targets) == 1 and targets[0].segments == dit_keys.WHOLE:
            out[f"{name}.{param}"] = parts[0][1]
            continue
        by_path = {t.path: (v, u) for t, v, u in parts}
        value = parts[0][1]
        result = value.new_empty((height, *value.shape[1:]))
        for target in targets:
            part, _ = by_path[target.path]
            at = 0
            for a, b in _segment_rows(target, unit, int(part.shape[0])):
                result[a:b] = part[at:at + b - a]
                at += b - a
        out[f"{name}.{param}"] = result
    return out
