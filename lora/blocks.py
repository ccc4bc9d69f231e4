"""Per-block LoRA weights: the block of every module a LoRA touches, and the block-weight notations
users paste, resolved to one multiplier per module.

UNets (SD1.5, SDXL): blocks are the original (LDM for SD1.5, SGM for SDXL) UNet blocks that
A1111's lora-block-weight extension and ComfyUI's Inspire Pack number, at one finer grain where a
notation needs it. Every module of both UNets belongs to exactly one unit:

=========  ================================================  =====================================
unit       diffusers modules (SD1.5)                         SDXL
=========  ================================================  =====================================
TE1, TE2   component text_encoder / text_encoder_2           TE2 on SDXL only
EMB        time_embedding                                    + add_embedding
IN00       conv_in                                           same
IN01-IN11  down_blocks.i resnets/attentions j -> IN{1+3i+j};  IN01-IN08, 3 down blocks
           down_blocks.i.downsamplers -> IN{3+3i}
M00.0-2    mid_block.resnets.0 / attentions.0 / resnets.1    same
OUT00-11   up_blocks.i resnets/attentions j -> OUT{3i+j};    OUT00-OUT08, 3 up blocks
           up_blocks.i.upsamplers -> OUT{3i+2}
FINAL      conv_norm_out, conv_out                           same
=========  ================================================  =====================================

``BASE`` names TE1, TE2, EMB and FINAL together (why EMB and FINAL: see the lbw notes below) and
``M00`` the three mid units. The mapping is the one diffusers uses to read original checkpoints
(`lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers`, `single_file_utils`); the tests check
it against the former.

Transformers (Flux, SD3.5): one unit per block of each block family (`arches.BlockFamily`), named
by the family's initial and the block index, as A1111's extension names Flux blocks:

=========  ================================================  =====================================
unit       Flux (FluxTransformer2DModel)                     SD3.5 (SD3Transformer2DModel)
=========  ================================================  =====================================
TE1-TE3    text_encoder (CLIP-L), text_encoder_2 (T5)        + text_encoder_2 CLIP-G, _3 T5
EMB        x_embedder, context_embedder, time_text_embed     pos_embed, context_embedder,
           (timestep, guidance and pooled-text embedders)    time_text_embed
D00-D18    transformer_blocks.i (double-stream)              -
S00-S37    single_transformer_blocks.i (single-stream)       -
J00-J37    -                                                 transformer_blocks.i (joint)
FINAL      norm_out, proj_out (BFL's final_layer)            norm_out, proj_out
=========  ================================================  =====================================

What BASE means on a DiT: everything outside the numbered blocks, i.e. TE*, EMB and FINAL, as on
the UNets. That is what Inspire Pack's first value does (it gives it to every LoRA module that is
in no double or single block, text encoders included), and A1111's 61-value Flux layout splits the
same modules into its CLIP, T5, IN (the ``*_in`` embedders) and OUT (``final_layer``) values, so
both layouts describe the same units. Block counts are the reference models' (SD3.5 Large: 38
joint blocks); a model or LoRA with fewer blocks simply leaves the extra units unused.

Notations (`parse_block_weights`):

- lbw vectors, comma-separated, one value per block of a fixed layout chosen by the count
  (`LBW_LAYOUTS`): SD1.5 17 / 26 (A1111) and 27 (Inspire Pack LyCORIS), SDXL 12 / 20 (A1111) and
  21 (Inspire Pack LyCORIS), Flux 58 (Inspire Pack: BASE, 19 double, 38 single) and 61 (A1111:
  CLIP, T5, IN, 19 double, 38 single, OUT), SD3.5 39 (BASE, 38 joint; no tool we know of has an
  SD3 layout, so this follows Inspire's Flux one). A leading ``NAME:`` (a preset-file line) or
  ``lbw=`` is dropped. Blocks a layout leaves out get 0, as A1111 does (its `to26` fills zeros).
  Modules outside the numbered blocks (EMB, FINAL) get BASE, as Inspire Pack does: A1111 leaves
  them at full strength and reports them as modules it could not place, which would keep part of
  a LoRA alive under NONE. A vector of any other length is an error naming the accepted counts:
  Inspire Pack instead hands values out in order to the blocks a LoRA happens to contain (and
  repeats the last value when the vector is short), so there one string means different blocks
  for different LoRAs; here position i is always the same block of the model.
- Inspire Pack's letters A, a, B, b (A, A/2, B, B/2: pass ``a=`` / ``b=``). Refused: R and U
  (random), A1111's X (inherits a prompt argument), Inspire's space-separated sub-vectors (they
  split a block's modules in file order) and its ``%`` spec (numbers the blocks a LoRA happens to
  have, so it means something else for each LoRA).
- Preset names (`PRESETS`): A1111's defaults and Inspire Pack's, each for the architecture its
  layout belongs to, and for the DiTs ALL / NONE / halves in the same style.
- diffusers dicts ``{"unet": {"down": .., "mid": .., "up": {"block_0": [..]}}, "text_encoder": ..,
  "text_encoder_2": ..}`` with diffusers' meaning, applied to every layer of each block: per-layer
  lists set resnets.j with attentions.j; a resampler takes the value of the last layer of its
  block (the original UNet puts the upsampler in that layer's block). Unnamed parts stay 1.0.
  For a DiT, ``{"transformer": {"transformer_blocks": .., "single_transformer_blocks": ..},
  "text_encoder": ..}``: each family (keyed by its diffusers ModuleList name) takes one number for
  all its blocks, a list with one value per block (or a 1-list), or ``{"block_3": ..}``. diffusers
  has no per-block dict for transformers: its `set_adapters` hands a transformer's dict to a
  substring match over module names (``"transformer_blocks.1"`` also scales blocks 10-18 and
  ``single_transformer_blocks.1``, 10-19), and a module no key matches and whose path has fewer than
  four parts (``single_transformer_blocks.0.proj_mlp``) makes it raise IndexError; so this follows
  the shape of its UNet dict instead.
- Unit dicts ``{"BASE": 0, "IN04": 0.5, "M00": 1}`` or ``{"BASE": 0, "S07": 0}`` (aliases first,
  then single units; the rest 1.0), and either dict as JSON text.

Pure Python: no torch, so a workflow's block weights can be checked before any model loads.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping

from .arches import ARCH_NAMES as ARCHES
from .arches import ARCHES as _LAYOUTS
from .errors import LoRAError

MAX_ABS_WEIGHT = 10.0
"""Largest accepted |weight|; Inspire Pack's widgets stop at the same bound, and larger values
only blow a LoRA up."""

_TE_UNITS = {"text_encoder": "TE1", "text_encoder_2": "TE2", "text_encoder_3": "TE3"}
# The diffusers modules of a DiT outside its block families (the same names on Flux and SD3.5;
# Flux's pos_embed has no weights, SD3's is the patch-embedding conv).
_DIT_EMB = ("pos_embed", "x_embedder", "context_embedder", "time_text_embed")
_DIT_FINAL = ("norm_out", "proj_out")


class BlockWeightError(LoRAError):
    """Block weights that cannot be used as given (wrong count, value, name or key), or a module
    that lies in no block of the architecture."""


def _ids(prefix: str, start: int, stop: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(start, stop))


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise BlockWeightError(f"unknown architecture {arch!r}; block weights exist for: {', '.join(ARCHES)}")


def _family_units(family) -> tuple[str, ...]:
    """The units of a transformer block family: its initial and the block index (D00, S12, J37)."""
    return _ids(family.name[0].upper(), 0, family.count)


@lru_cache(maxsize=None)
def block_units(arch: str) -> tuple[str, ...]:
    """Every unit of `arch` in model order: TE1, (TE2, TE3,) EMB, then IN00.., M00.0-2, OUT00.. on a
    UNet or each block family's units on a transformer (D00.., S00..; J00..), then FINAL."""
    _check_arch(arch)
    layout = _LAYOUTS[arch]
    tes = tuple(_TE_UNITS[te] for te in layout.text_encoders)
    if layout.blocks:
        return (*tes, "EMB", *(u for family in layout.blocks for u in _family_units(family)), "FINAL")
    per = layout.slots_per_level
    # conv_in, then `per` slots per down block, less the downsampler the last one does not have
    n_in = len(layout.down_attention) * per
    n_out = len(layout.up_attention) * per
    return (*tes, "EMB", *_ids("IN", 0, n_in), "M00.0", "M00.1", "M00.2", *_ids("OUT", 0, n_out), "FINAL")


@lru_cache(maxsize=None)
def _aliases(arch: str) -> dict[str, tuple[str, ...]]:
    layout = _LAYOUTS[arch]
    tes = tuple(_TE_UNITS[te] for te in layout.text_encoders)
    if layout.blocks:
        return {"BASE": (*tes, "EMB", "FINAL")}
    return {"BASE": (*tes, "EMB", "FINAL"), "M00": ("M00.0", "M00.1", "M00.2")}


@lru_cache(maxsize=None)
def _side_slots(arch: str, side: str) -> tuple[tuple[tuple[str, ...], str | None, bool], ...]:
    """Per down or up block: the unit of each layer j, the unit of its resampler (None for the
    last block, which has none) and whether it has attentions."""
    layout = _LAYOUTS[arch]
    per = layout.slots_per_level
    attention = layout.down_attention if side == "down" else layout.up_attention
    slots = []
    for i, has_attention in enumerate(attention):
        if side == "down":
            layers = tuple(f"IN{1 + per * i + j:02d}" for j in range(layout.layers_per_block))
            resampler = f"IN{per * (i + 1):02d}"
        else:
            layers = tuple(f"OUT{per * i + j:02d}" for j in range(per))
            # the original UNet appends the upsampler to the block of the up block's last layer
            resampler = layers[-1]
        slots.append((layers, resampler if i < len(attention) - 1 else None, has_attention))
    return tuple(slots)


@lru_cache(maxsize=None)
def _prefix_table(arch: str) -> dict[str, str]:
    layout = _LAYOUTS[arch]
    if layout.blocks:
        table = {**dict.fromkeys(_DIT_EMB, "EMB"), **dict.fromkeys(_DIT_FINAL, "FINAL")}
        for family in layout.blocks:
            table.update((f"{family.path}.{i}", unit) for i, unit in enumerate(_family_units(family)))
        return table
    table = {"conv_in": "IN00", "time_embedding": "EMB", "conv_norm_out": "FINAL", "conv_out": "FINAL"}
    if layout.add_embedding:
        table["add_embedding"] = "EMB"
    table["mid_block.resnets.0"] = "M00.0"
    table["mid_block.attentions.0"] = "M00.1"
    table["mid_block.resnets.1"] = "M00.2"
    for side, resampler_name in (("down", "downsamplers"), ("up", "upsamplers")):
        for i, (layers, resampler, has_attention) in enumerate(_side_slots(arch, side)):
            for j, unit in enumerate(layers):
                table[f"{side}_blocks.{i}.resnets.{j}"] = unit
                if has_attention:
                    table[f"{side}_blocks.{i}.attentions.{j}"] = unit
            if resampler:
                table[f"{side}_blocks.{i}.{resampler_name}.0"] = resampler
    return table


def block_table(arch: str) -> dict[str, str]:
    """diffusers denoiser module prefix -> unit for `arch`, e.g. ``"down_blocks.1.attentions.0":
    "IN04"`` or ``"single_transformer_blocks.7": "S07"`` (a fresh copy). Every module of the UNet
    or transformer lies under exactly one of these prefixes."""
    _check_arch(arch)
    return dict(_prefix_table(arch))


def _denoiser_parts(arch: str) -> str:
    """The denoiser's top-level parts, for messages."""
    layout = _LAYOUTS[arch]
    if layout.blocks:
        families = ", ".join(f"{f.path}.0-{f.count - 1}" for f in layout.blocks)
        return f"{', '.join(_DIT_EMB)}, {families}, {', '.join(_DIT_FINAL)}"
    tops = "conv_in, time_embedding, " + ("add_embedding, " if layout.add_embedding else "")
    return (f"{tops}down_blocks.0-{len(layout.down_attention) - 1}, mid_block, "
            f"up_blocks.0-{len(layout.up_attention) - 1}, conv_norm_out, conv_out")


def block_of(component: str, path: str, arch: str) -> str:
    """The unit of module `path` of `component` (the denoiser, "unet" or "transformer", or a text
    encoder).

    ``block_of("unet", "down_blocks.0.downsamplers.0.conv", "sd15") == "IN03"``,
    ``block_of("transformer", "single_transformer_blocks.7.proj_mlp", "flux") == "S07"``; every
    text-encoder module is TE1 / TE2 / TE3. Raises BlockWeightError for a component or path that
    the architecture does not have (a LoRA made for another base model, most likely).
    """
    _check_arch(arch)
    layout = _LAYOUTS[arch]
    if component in layout.text_encoders:
        return _TE_UNITS[component]
    if component != layout.denoiser:
        valid = ", ".join(layout.components)
        raise BlockWeightError(
            f"component {component!r} has no block weights on {arch}; valid components: {valid}",
            key=path,
            value=component,
            limit=valid,
        )
    table = _prefix_table(arch)
    parts = path.split(".")
    # UNet block prefixes have 4 parts (down_blocks.1.attentions.0), 3 (mid_block.resnets.0) or 1
    # (conv_in); transformer ones 2 (transformer_blocks.3) or 1 (proj_out).
    for n in (4, 3, 2, 1):
        unit = table.get(".".join(parts[:n])) if len(parts) >= n else None
        if unit is not None:
            return unit
    kind = "UNet" if layout.denoiser == "unet" else "transformer"
    raise BlockWeightError(
        f"{kind} module {path!r} lies in no block of the {arch} {kind} ({_denoiser_parts(arch)})",
        key=path,
        limit=arch,
        fix=f"check that the LoRA was made for {arch}.",
    )


LBW_LAYOUTS: dict[str, dict[int, tuple[str, tuple[str, ...]]]] = {
    # Block orders as A1111's extension defines them (BLOCKID17/26/12/20 in
    # sd-webui-lora-block-weight, scripts/lora_block_weight.py) and as Inspire Pack's LyCORIS presets
    # count the blocks they cover (resources/lbw-preset.txt: mid split into middle_block.0/1/2).
    "sd15": {
        17: ("A1111 / Inspire Pack LoRA layout", ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", 3, 12))),
        26: ("A1111 full layout", ("BASE", *_ids("IN", 0, 12), "M00", *_ids("OUT", 0, 12))),
        27: ("Inspire Pack LyCORIS layout", ("BASE", *_ids("IN", 1, 12), "M00.0", "M00.1", "M00.2", *_ids("OUT", 0, 12))),
    },
    "sdxl": {
        12: ("A1111 / Inspire Pack LoRA layout", ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", 0, 6))),
        20: ("A1111 full layout", ("BASE", *_ids("IN", 0, 9), "M00", *_ids("OUT", 0, 9))),
        21: ("Inspire Pack LyCORIS layout", ("BASE", *_ids("IN", 1, 9), "M00.0", "M00.1", "M00.2", *_ids("OUT", 0, 9))),
    },
    # Flux: Inspire Pack's vector is BASE then the double blocks then the single blocks
    # (lora_block_weight.py sorts a LoRA's double_blocks.N, then single_blocks.N, after the base
    # value); A1111's is BLOCKIDFLUX: CLIP, T5, IN, D00-D18, S00-S37, OUT (get_flux_blocks puts
    # every "*_in" embedder in IN and final_layer in OUT).
    "flux": {
        58: ("Inspire Pack layout", ("BASE", *_ids("D", 0, 19), *_ids("S", 0, 38))),
        61: ("A1111 Flux layout, its CLIP, T5, IN and OUT being TE1, TE2, EMB and FINAL", ("TE1", "TE2", "EMB", *_ids("D", 0, 19), *_ids("S", 0, 38), "FINAL")),
    },
    "sd3": {
        39: ("joint-block layout", ("BASE", *_ids("J", 0, 38))),
    },
}
"""arch -> value count -> (name, the block of each position). BASE and M00 are the aliases."""


@dataclass(frozen=True)
class Preset:
    """A named lbw vector: the architecture its layout is for, the values as written, and the
    project whose defaults it comes from."""

    name: str
    arch: str
    values: str
    origin: str


_A1111 = "A1111 sd-webui-lora-block-weight default"
_INSPIRE = "ComfyUI Inspire Pack default"
_INSPIRE_FULL = "ComfyUI Inspire Pack default, as it applies to a LoRA with all 57 blocks"
_LOOM = "LoRA Loom, in the style of Inspire Pack's SDXL-*ALL"


def _flux(base: Any, double: Any, single: Any) -> str:
    return ",".join(map(str, (base, *double, *single)))


# Values transcribed from sd-webui-lora-block-weight (hako-mikan), scripts/lora_block_weight.py,
# DEF_WEIGHT_PRESET, and from ComfyUI-Inspire-Pack (ltdrdata), resources/lbw-preset.txt (its @-lines
# are XY-plot generators, not weights). Inspire's FLUX-DBL-* lines have 18 values, which its loader
# deals out to the first 17 blocks a LoRA has and repeats the last value for the rest; they are
# written out here as the 58 values that gives on a LoRA with every double and single block (so
# FLUX-DBL-TAIL keeps the single blocks on, as it does there).
_PRESET_ROWS = (
    ("NONE", "sd15", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", _A1111),
    ("ALL", "sd15", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", _A1111),
    ("INS", "sd15", "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0", _A1111),
    ("IND", "sd15", "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0", _A1111),
    ("INALL", "sd15", "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", _A1111),
    ("MIDD", "sd15", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0", _A1111),
    ("OUTD", "sd15", "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", _A1111),
    ("OUTS", "sd15", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1", _A1111),
    ("OUTALL", "sd15", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", _A1111),
    ("ALL0.5", "sd15", "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5", _A1111),
    ("SD-NONE", "sd15", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SD-ALL", "sd15", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", _INSPIRE),
    ("SD-INS", "sd15", "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SD-IND", "sd15", "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SD-INALL", "sd15", "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SD-MIDD", "sd15", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0", _INSPIRE),
    ("SD-MIDD0.2", "sd15", "1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0", _INSPIRE),
    ("SD-MIDD0.8", "sd15", "1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SD-MOUT", "sd15", "1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0", _INSPIRE),
    ("SD-OUTD", "sd15", "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", _INSPIRE),
    ("SD-OUTS", "sd15", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1", _INSPIRE),
    ("SD-OUTALL", "sd15", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", _INSPIRE),
    ("SD-ROUT", "sd15", "1,1,1,1,1,1,1,1,R,R,R,R,R,R,R,R,R", _INSPIRE),
    ("SD-AOUT", "sd15", "A,1,1,1,1,1,1,1,1,1,1,1,A,A,A,A,A", _INSPIRE),
    ("SD-AB", "sd15", "A,B,B,B,B,B,B,B,B,B,B,B,A,A,A,A,A", _INSPIRE),
    ("SD-ALL0.5", "sd15", "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5", _INSPIRE),
    ("SD-LyC-NONE", "sd15", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SD-LyC-ALL", "sd15", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", _INSPIRE),
    ("SD-LyC-INALL", "sd15", "1,1,1,1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SD-LyC-MIDALL", "sd15", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SD-LyC-OUTALL", "sd15", "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1", _INSPIRE),
    ("SDXL-NONE", "sdxl", "0,0,0,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SDXL-ALL", "sdxl", "1,1,1,1,1,1,1,1,1,1,1,1", _INSPIRE),
    ("SDXL-INALL", "sdxl", "1,1,1,1,1,0,0,0,0,0,0,0", _INSPIRE),
    ("SDXL-MIDALL", "sdxl", "1,0,0,0,0,1,0,0,0,0,0,0", _INSPIRE),
    ("SDXL-OUTALL", "sdxl", "1,0,0,0,0,0,1,1,1,1,1,1", _INSPIRE),
    ("SDXL-LyC-NONE", "sdxl", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SDXL-LyC-ALL", "sdxl", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", _INSPIRE),
    ("SDXL-LyC-INALL", "sdxl", "1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SDXL-LyC-MIDALL", "sdxl", "1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0", _INSPIRE),
    ("SDXL-LyC-OUTALL", "sdxl", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", _INSPIRE),
    ("FLUXALL", "flux", ",".join(["1"] * 61), _A1111),
    ("FLUX-DBL-FRONT", "flux", _flux(1, [1] * 5 + [0] * 14, [0] * 38), _INSPIRE_FULL),
    ("FLUX-DBL-MID", "flux", _flux(0, [0] * 5 + [1] * 6 + [0] * 8, [0] * 38), _INSPIRE_FULL),
    ("FLUX-DBL-TAIL", "flux", _flux(0, [0] * 11 + [1] * 8, [1] * 38), _INSPIRE_FULL),
    ("FLUX-ALL", "flux", _flux(1, [1] * 19, [1] * 38), _LOOM),
    ("FLUX-NONE", "flux", _flux(0, [0] * 19, [0] * 38), _LOOM),
    ("FLUX-DBL-ALL", "flux", _flux(1, [1] * 19, [0] * 38), _LOOM),
    ("FLUX-SGL-ALL", "flux", _flux(1, [0] * 19, [1] * 38), _LOOM),
    ("SD3-ALL", "sd3", ",".join(["1"] * 39), _LOOM),
    ("SD3-NONE", "sd3", ",".join(["0"] * 39), _LOOM),
    ("SD3-FRONT", "sd3", ",".join(["1"] * 20 + ["0"] * 19), _LOOM),
    ("SD3-TAIL", "sd3", ",".join(["1"] + ["0"] * 19 + ["1"] * 19), _LOOM),
)
PRESETS: dict[str, Preset] = {row[0]: Preset(*row) for row in _PRESET_ROWS}
"""Preset name -> Preset. Names are matched exactly, then ignoring case."""


def preset_names(arch: str) -> tuple[str, ...]:
    """The preset names usable on `arch`."""
    _check_arch(arch)
    return tuple(name for name, preset in PRESETS.items() if preset.arch == arch)


@dataclass(frozen=True)
class BlockWeights:
    """One weight per unit of `arch` (`block_units(arch)` order): the parsed form of any notation.

    Two spellings of the same table compare equal and hash alike; ``source`` only says how the
    weights were written, for messages.
    """

    arch: str
    values: tuple[float, ...]
    source: str = field(default="", compare=False)

    def __post_init__(self):
        _check_arch(self.arch)
        units = block_units(self.arch)
        if len(self.values) != len(units):
            raise BlockWeightError(f"{len(self.values)} values for the {len(units)} units of {self.arch}", limit=units)
        object.__setattr__(self, "values", tuple(_weight(v, unit) for unit, v in zip(units, self.values)))

    @classmethod
    def identity(cls, arch: str, source: str = "no block weights") -> "BlockWeights":
        """Weight 1.0 everywhere."""
        return cls(arch, (1.0,) * len(block_units(arch)), source)

    @property
    def weights(self) -> dict[str, float]:
        """unit -> weight."""
        return dict(zip(block_units(self.arch), self.values))

    @property
    def is_identity(self) -> bool:
        """True when every weight is 1.0 (the block weights change nothing)."""
        return all(v == 1.0 for v in self.values)

    def scale(self, component: str, path: str) -> float:
        """The multiplier of module `path` of `component` (see `block_of`)."""
        return self.values[_unit_index(self.arch)[block_of(component, path, self.arch)]]

    def describe(self) -> str:
        """Compact ``unit=weight`` list, runs of equal weights within IN, M00 or OUT joined,
        e.g. ``TE1=1, EMB=1, IN00-IN02=0, ...``."""
        runs: list[list[Any]] = []
        for unit, value in zip(block_units(self.arch), self.values):
            family = re.match(r"[A-Z]+", unit).group()
            if runs and runs[-1][2] == family and runs[-1][3] == value:
                runs[-1][1] = unit
            else:
                runs.append([unit, unit, family, value])
        return ", ".join(f"{a}={v:g}" if a == b else f"{a}-{b}={v:g}" for a, b, _, v in runs)


@lru_cache(maxsize=None)
def _unit_index(arch: str) -> dict[str, int]:
    return {unit: i for i, unit in enumerate(block_units(arch))}


def _weight(value: Any, where: str) -> float:
    # bool is an int in Python; True as a weight is a typo, not 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BlockWeightError(f"{where}: {value!r} is not a number", key=where, value=value)
    w = float(value)
    if not math.isfinite(w):
        raise BlockWeightError(f"{where}: {value!r} is not finite", key=where, value=value)
    if abs(w) > MAX_ABS_WEIGHT:
        raise BlockWeightError(
            f"{where}: {w:g} is beyond the limit of +-{MAX_ABS_WEIGHT:g}", key=where, value=w, limit=MAX_ABS_WEIGHT
        )
    return w


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _token_weight(token: str, where: str, a: float | None, b: float | None) -> float:
    if _NUMBER.fullmatch(token):
        return _weight(float(token), where)
    if token in ("A", "a", "B", "b"):
        given = a if token in "Aa" else b
        if given is None:
            raise BlockWeightError(
                f"{where}: {token!r} is Inspire Pack's letter for its {token.upper()} value"
                + (" halved" if token.islower() else "")
                + ", and no value was given",
                key=where,
                value=token,
                fix=f"pass {token.lower()}=<number> (Inspire Pack's default A is 4.0, B 1.0) or write numbers.",
            )
        return _weight(given / 2 if token.islower() else given, where)
    if token in ("R", "r", "U", "u"):
        raise BlockWeightError(
            f"{where}: {token!r} draws a random weight on every run; LoRA Loom needs reproducible weights",
            key=where,
            value=token,
            fix="replace it with a number.",
        )
    if token[:1] == "X":
        raise BlockWeightError(
            f"{where}: {token!r} is A1111's X, which takes its value from the prompt's x= argument",
            key=where,
            value=token,
            fix="replace it with a number.",
        )
    if not token:
        raise BlockWeightError(f"{where} is empty", key=where, fix="remove the extra comma or write a number.")
    if len(token.split()) > 1:
        raise BlockWeightError(
            f"{where}: {token!r} is an Inspire Pack sub-vector, which hands values to a block's modules in "
            "the order the file lists them; not supported",
            key=where,
            value=token,
            fix="give the block one number.",
        )
    raise BlockWeightError(f"{where}: {token!r} is not a number", key=where, value=token)


def _runs(ids: Iterable[str]) -> str:
    """Unit names for a message, three or more consecutive ones of a family joined:
    ``BASE, D00-D18, S00-S37``."""
    out: list[list[Any]] = []  # [prefix, first number, last number, first name, last name]
    for unit in ids:
        m = re.fullmatch(r"([A-Z]+)(\d\d)", unit)
        if m and out and out[-1][0] == m[1] and out[-1][2] + 1 == int(m[2]):
            out[-1][2], out[-1][4] = int(m[2]), unit
        else:
            out.append([m[1], int(m[2]), int(m[2]), unit, unit] if m else [None, 0, 0, unit, unit])
    return ", ".join(
        f"{first}-{last}" if b - a >= 2 else (f"{first}, {last}" if b > a else first) for _, a, b, first, last in out
    )


def _layouts_text(arch: str) -> str:
    return "; ".join(f"{count} = {name} ({_runs(ids)})" for count, (name, ids) in LBW_LAYOUTS[arch].items())


def _from_vector(text: str, arch: str, source: str, a: float | None, b: float | None) -> BlockWeights:
    tokens = [t.strip() for t in text.split(",")]
    layouts = LBW_LAYOUTS[arch]
    if len(tokens) not in layouts:
        other = [x for x in ARCHES if x != arch and len(tokens) in LBW_LAYOUTS[x]]
        hint = f" {len(tokens)} values is a {other[0]} layout: is the base model {other[0]}?" if other else ""
        short = layouts.get(len(tokens) + 1)
        if short and short[1][0] == "BASE":
            # one value per block and no BASE: the usual slip on a DiT (57 values for Flux's 57 blocks)
            hint += f" {len(tokens)} is one per block without the leading BASE value: is it missing?"
        raise BlockWeightError(
            f"block weights {source}: {len(tokens)} values; {arch} accepts {_layouts_text(arch)}.{hint}",
            value=len(tokens),
            limit=tuple(layouts),
        )
    _, ids = layouts[len(tokens)]
    weights = [_token_weight(t, f"value {i + 1} ({block})", a, b) for i, (t, block) in enumerate(zip(tokens, ids))]
    # Units a layout does not list get 0, as in A1111 (to26 starts from zeros).
    table = dict.fromkeys(block_units(arch), 0.0)
    aliases = _aliases(arch)
    for block, w in zip(ids, weights):
        for unit in aliases.get(block, (block,)):
            table[unit] = w
    return BlockWeights(arch, tuple(table.values()), source)


def _from_preset(name: str, arch: str, a: float | None, b: float | None) -> BlockWeights:
    preset = PRESETS.get(name)
    if preset is None:
        folded = [p for key, p in PRESETS.items() if key.lower() == name.lower()]
        preset = folded[0] if len(folded) == 1 else None
    if preset is None:
        raise BlockWeightError(
            f"unknown block-weight preset {name!r}; valid presets for {arch}: {', '.join(preset_names(arch))}",
            value=name,
            limit=preset_names(arch),
            fix="or write the comma-separated values.",
        )
    if preset.arch != arch:
        raise BlockWeightError(
            f"preset {preset.name!r} ({preset.origin}) is for {preset.arch}, not {arch}; "
            f"valid presets for {arch}: {', '.join(preset_names(arch))}",
            value=preset.name,
            limit=preset_names(arch),
        )
    return _from_vector(preset.values, arch, f"preset {preset.name} ({preset.origin})", a, b)


def _denoiser_units(arch: str) -> tuple[str, ...]:
    tes = set(_TE_UNITS.values())
    return tuple(u for u in block_units(arch) if u not in tes)


def _layer_list(value: Any, n: int, where: str, per: str = "layer") -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = list(value) * n
        if len(value) != n:
            raise BlockWeightError(
                f"{where}: {len(value)} scales; expected {n} (one per {per}) or 1", key=where, value=list(value), limit=n
            )
        return [_weight(v, f"{where}[{j}]") for j, v in enumerate(value)]
    return [_weight(value, where)] * n


def _refuse_unknown(where: str, keys: Iterable[Any], valid: tuple[str, ...], valid_text: str = "") -> None:
    """Raise naming the keys of a block-weight dict that are not in `valid`, if any."""
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise BlockWeightError(
            f"{where}: unknown key(s) {unknown}; valid keys{valid_text}: {', '.join(valid)}",
            key=str(unknown[0]),
            limit=valid,
        )


def _apply_unet_dict(spec: Mapping[str, Any], arch: str, table: dict[str, float]) -> None:
    _refuse_unknown("unet block weights", sorted(spec), ("down", "mid", "up"))
    if "mid" in spec:
        w = _layer_list(spec["mid"], 1, "unet.mid")[0]
        for unit in _aliases(arch)["M00"]:
            table[unit] = w
    for side in ("down", "up"):
        if side not in spec:
            continue
        slots = _side_slots(arch, side)
        names = [f"block_{i}" for i in range(len(slots))]
        blocks = spec[side]
        if not isinstance(blocks, Mapping):
            blocks = dict.fromkeys(names, blocks)
        _refuse_unknown(f"unet.{side}", blocks, tuple(names), f" on {arch}")
        for name, value in blocks.items():
            layers, resampler, _ = slots[names.index(name)]
            weights = _layer_list(value, len(layers), f"unet.{side}.{name}")
            table.update(zip(layers, weights))
            if resampler:
                table[resampler] = weights[-1]  # a resampler follows the last layer of its block


def _apply_transformer_dict(spec: Mapping[str, Any], arch: str, table: dict[str, float]) -> None:
    families = {family.path: family for family in _LAYOUTS[arch].blocks}
    _refuse_unknown("transformer block weights", sorted(spec), tuple(families), f" on {arch}")
    for path, value in spec.items():
        units = _family_units(families[path])
        where = f"transformer.{path}"
        if isinstance(value, Mapping):
            names = [f"block_{i}" for i in range(len(units))]
            _refuse_unknown(where, value, tuple(names), f" on {arch}")
            for name, v in value.items():
                table[units[names.index(name)]] = _weight(v, f"{where}.{name}")
        else:
            table.update(zip(units, _layer_list(value, len(units), where, "block")))


def _from_dict(spec: Mapping[str, Any], arch: str, source: str) -> BlockWeights:
    if not spec:
        return BlockWeights.identity(arch, source)
    layout = _LAYOUTS[arch]
    denoiser = layout.denoiser
    components = layout.components
    names = (*_aliases(arch), *block_units(arch))
    keys = list(spec)
    table = dict.fromkeys(block_units(arch), 1.0)
    if all(k in components for k in keys):
        for component, value in spec.items():
            if component != denoiser:
                table[_TE_UNITS[component]] = _weight(value, component)
            elif isinstance(value, Mapping):
                (_apply_transformer_dict if layout.blocks else _apply_unet_dict)(value, arch, table)
            else:
                w = _weight(value, denoiser)
                table.update(dict.fromkeys(_denoiser_units(arch), w))
        return BlockWeights(arch, tuple(table.values()), source)
    if all(k in names for k in keys):
        aliases = _aliases(arch)
        # aliases first, so {"BASE": 0, "EMB": 1} keeps EMB at 1 whatever the key order
        for key in sorted(keys, key=lambda k: k not in aliases):
            w = _weight(spec[key], key)
            for unit in aliases.get(key, (key,)):
                table[unit] = w
        return BlockWeights(arch, tuple(table.values()), source)
    unknown = [k for k in keys if k not in components and k not in names]
    detail = f"unknown key(s) {unknown}" if unknown else "diffusers component keys mixed with block names"
    raise BlockWeightError(
        f"block-weight dict: {detail}; use either diffusers components ({', '.join(components)}) "
        f"or block names ({_runs(names)})",
        key=str((unknown or keys)[0]),
        limit=(*components, *names),
    )


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BlockWeightError(f"block-weight JSON names {key!r} twice", key=key)
        seen[key] = value
    return seen


def _from_text(text: str, arch: str, a: float | None, b: float | None) -> BlockWeights:
    text = text.strip()
    if not text:
        return BlockWeights.identity(arch)
    if text.startswith("{"):
        try:
            spec = json.loads(text, object_pairs_hook=_json_object)
        except BlockWeightError:
            raise
        except (ValueError, RecursionError) as e:  # also an endless integer or nesting past Python's stack
            raise BlockWeightError(f"block-weight JSON does not parse: {str(e)[:200]}", value=text) from None
        return _from_dict(spec, arch, "JSON")
    if text.startswith("%"):
        raise BlockWeightError(
            "Inspire Pack's % block spec numbers only the blocks a LoRA happens to have, so it means "
            "different blocks for different LoRAs; not supported",
            value=text,
            fix='write the comma-separated values, or a JSON dict of blocks such as {"BASE": 1, "IN04": 0.5}.',
        )
    if text[:4].lower() == "lbw=":
        text = text[4:].strip()
    source = "lbw vector"
    name, colon, rest = text.partition(":")
    if colon:
        # a preset-file line "NAME:v1,v2,...": both tools read only the values
        text, source = rest.strip(), f"lbw line {name.strip()!r}"
    if "," not in text and not _NUMBER.fullmatch(text):
        return _from_preset(text, arch, a, b)
    return _from_vector(text, arch, source, a, b)


def parse_block_weights(
    spec: str | Mapping[str, Any] | BlockWeights | None,
    arch: str,
    *,
    a: float | None = None,
    b: float | None = None,
) -> BlockWeights:
    """Read block weights in any supported notation (see the module docstring) for `arch`.

    `spec`: an lbw vector or preset name, JSON text, a diffusers or unit dict, a BlockWeights
    (returned as is), or None / "" (weight 1.0 everywhere). `a`, `b`: the values of Inspire Pack's
    letters A and B. Raises BlockWeightError naming the position or key, the value and what is
    accepted (for a wrong count: the counts `arch` accepts and the blocks of each).
    """
    _check_arch(arch)
    if spec is None:
        return BlockWeights.identity(arch)
    if isinstance(spec, BlockWeights):
        if spec.arch != arch:
            raise BlockWeightError(f"block weights for {spec.arch} used on {arch}", value=spec.arch, limit=arch)
        return spec
    if isinstance(spec, Mapping):
        return _from_dict(spec, arch, "dict")
    if isinstance(spec, str):
        return _from_text(spec, arch, a, b)
    raise BlockWeightError(
        f"block weights must be text or a dict, not {type(spec).__name__}", value=spec, limit=("str", "dict")
    )


def block_scales(
    spec: str | Mapping[str, Any] | BlockWeights | None,
    arch: str,
    modules: Mapping[str, Iterable[str]],
    *,
    a: float | None = None,
    b: float | None = None,
) -> dict[str, dict[str, float]]:
    """The multiplier of every module: ``{component: {module_path: scale}}`` for `modules`
    (``{component: module paths}``, e.g. `LoRA.components`). 1.0 wherever the spec says nothing;
    see `parse_block_weights` for `spec`, `a` and `b`."""
    weights = parse_block_weights(spec, arch, a=a, b=b)
    return {component: {path: weights.scale(component, path) for path in paths} for component, paths in modules.items()}
