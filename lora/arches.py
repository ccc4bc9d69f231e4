"""The architectures LoRA Loom supports, described once: SD1.5 and SDXL.

Readers and writers (SGM block numbering), block weights (A1111 / Inspire Pack block units), LoRA
matching (error messages) and the base-model code (pipeline classes, single-file export, presets'
checks) consult these descriptions instead of keeping their own copies of the block layout.

Both UNets have ``layers_per_block`` 2: a down block holds 2 resnets (and 2 attentions when it has
cross-attention) then a downsampler, an up block 3 resnets (and attentions) then an upsampler; the
last down block and the last up block have no resampler. In the original (LDM / SGM) numbering each
level therefore takes ``layers_per_block + 1`` input or output block slots.

Pure Python: no torch, so block weights can be checked before anything is imported or loaded.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """One architecture: its UNet's block layout, its text encoders and its diffusers pipeline."""

    name: str
    label: str  # how users write it: "SD1.5", "SDXL"
    pipeline_class: str  # the diffusers pipeline class name
    layers_per_block: int
    down_attention: tuple[bool, ...]  # per down block: has cross-attention
    up_attention: tuple[bool, ...]  # per up block: has cross-attention
    text_encoders: tuple[str, ...]  # pipeline component names
    add_embedding: bool  # SDXL's added (text_time) embedding

    @property
    def slots_per_level(self) -> int:
        """Original input/output block slots per UNet level: the layers plus a resampler."""
        return self.layers_per_block + 1


ARCHES: dict[str, Arch] = {
    # SD1.5: 3 CrossAttnDown + 1 Down; 1 Up + 3 CrossAttnUp; CLIP ViT-L text encoder.
    "sd15": Arch("sd15", "SD1.5", "StableDiffusionPipeline", 2, (True, True, True, False),
                 (False, True, True, True), ("text_encoder",), False),
    # SDXL: 1 Down + 2 CrossAttnDown; 2 CrossAttnUp + 1 Up; CLIP ViT-L and OpenCLIP ViT-bigG.
    "sdxl": Arch("sdxl", "SDXL", "StableDiffusionXLPipeline", 2, (False, True, True),
                 (True, True, False), ("text_encoder", "text_encoder_2"), True),
}
ARCH_NAMES = tuple(ARCHES)
