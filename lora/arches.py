"""The architectures LoRA Loom supports, described once: SD1.5 and SDXL (UNet denoisers), Flux and
SD3.5 (transformer denoisers).

Readers and writers (SGM block numbering), block weights (A1111 / Inspire Pack block units), LoRA
matching (error messages) and the base-model code (pipeline classes, detection, sampling, presets'
checks) consult these descriptions instead of keeping their own copies of the block layout.

Each architecture's denoiser is a pipeline component: "unet" (UNet2DConditionModel) or
"transformer" (a DiT). A LoRA's weight on "the model" is its weight on that component.

UNets: both have ``layers_per_block`` 2: a down block holds 2 resnets (and 2 attentions when it has
cross-attention) then a downsampler, an up block 3 resnets (and attentions) then an upsampler; the
last down block and the last up block have no resampler. In the original (LDM / SGM) numbering each
level therefore takes ``layers_per_block + 1`` input or output block slots.

Transformers: a list of block families, each a ModuleList of identical blocks in the denoiser.
Flux (dev and schnell) has 19 double-stream blocks (separate image and text weights, joint
attention) then 38 single-stream blocks (one stream over the concatenated tokens, attention and
MLP side by side); SD3.5 Large has 38 joint blocks (SD3 Medium and SD3.5 Medium 24: a family's count
here is the reference model's, a loaded model's own config says how many it has).

Pure Python: no torch, so block weights can be checked before anything is imported or loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

DENOISERS = ("unet", "transformer")
"""The pipeline components a denoiser can be: what a LoRA's model weight (not its text-encoder
weight) applies to."""


@dataclass(frozen=True)
class BlockFamily:
    """One family of identical transformer blocks: a ModuleList at ``path`` in the denoiser."""

    name: str  # how block weights and messages name the family: "double", "single", "joint"
    path: str  # the ModuleList's module path: "transformer_blocks", "single_transformer_blocks"
    count: int  # blocks in the reference model


@dataclass(frozen=True)
class Sampling:
    """How the architecture's diffusers pipeline samples.

    ``negative_prompt``: whether guidance_scale is classifier-free guidance with a negative prompt
    (the model runs on the prompt and the negative prompt, guidance_scale mixes them), or, False,
    Flux's distilled guidance (dev: guidance_scale is an input of the model, one run per step;
    schnell ignores it) and the pipeline call takes no negative prompt. ``flow_matching``: a
    velocity (rectified-flow) model, sampled by flow-matching schedulers, not noise-prediction ones.
    ``max_sequence_length``: the T5 prompt length the pipeline pads to by default.
    ``pixel_multiple``: what image width and height must be multiples of: the VAE's 8x8 pixel
    blocks, times 2 where the transformer takes 2x2 latent patches (Flux packs them; SD3 embeds them).
    ``resolution_shift``: the pipeline always computes a resolution-dependent shift of the flow
    schedule (``mu``, from the image's latent token count) and hands it to the scheduler's
    set_timesteps (FluxPipeline does; StableDiffusion3Pipeline only when the scheduler's config asks
    for dynamic shifting, and SD3.5's asks for a static shift of 3.0 instead). A scheduler that cannot
    take ``mu`` would sample with a different schedule, so Sample does not offer it there.
    """

    negative_prompt: bool = True
    flow_matching: bool = False
    max_sequence_length: int | None = None
    pixel_multiple: int = 8
    resolution_shift: bool = False


@dataclass(frozen=True)
class Arch:
    """One architecture: its denoiser (a UNet's block layout, or a transformer's block families),
    its text encoders, its diffusers pipeline and how that pipeline samples."""

    name: str
    label: str  # how users write it: "SD1.5", "SDXL", "Flux", "SD3.5"
    pipeline_class: str  # the diffusers pipeline class name
    denoiser: str  # the pipeline component: "unet" or "transformer"
    denoiser_class: str  # its diffusers model class name
    text_encoders: tuple[str, ...]  # pipeline component names
    sampling: Sampling = Sampling()
    # UNet layout (empty for a transformer)
    layers_per_block: int = 0
    down_attention: tuple[bool, ...] = ()  # per down block: has cross-attention
    up_attention: tuple[bool, ...] = ()  # per up block: has cross-attention
    add_embedding: bool = False  # SDXL's added (text_time) embedding
    # transformer block families, in the order the model runs them (empty for a UNet)
    blocks: tuple[BlockFamily, ...] = ()

    @property
    def slots_per_level(self) -> int:
        """Original input/output block slots per UNet level: the layers plus a resampler."""
        return self.layers_per_block + 1

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline components a LoRA can touch: the denoiser, then the text encoders."""
        return (self.denoiser, *self.text_encoders)


ARCHES: dict[str, Arch] = {
    # SD1.5: 3 CrossAttnDown + 1 Down; 1 Up + 3 CrossAttnUp; CLIP ViT-L text encoder.
    "sd15": Arch("sd15", "SD1.5", "StableDiffusionPipeline", "unet", "UNet2DConditionModel", ("text_encoder",),
                 layers_per_block=2, down_attention=(True, True, True, False), up_attention=(False, True, True, True)),
    # SDXL: 1 Down + 2 CrossAttnDown; 2 CrossAttnUp + 1 Up; CLIP ViT-L and OpenCLIP ViT-bigG.
    "sdxl": Arch("sdxl", "SDXL", "StableDiffusionXLPipeline", "unet", "UNet2DConditionModel",
                 ("text_encoder", "text_encoder_2"), layers_per_block=2, down_attention=(False, True, True),
                 up_attention=(True, True, False), add_embedding=True),
    # Flux: CLIP ViT-L (pooled) and T5-XXL (per token); dev's guidance is distilled into the model
    # (a guidance embedding), schnell has none and ignores guidance_scale. True CFG (FluxPipeline's
    # true_cfg_scale with a negative prompt) doubles the cost and is not what these models were
    # trained for, so Sample does not offer it.
    "flux": Arch("flux", "Flux", "FluxPipeline", "transformer", "FluxTransformer2DModel",
                 ("text_encoder", "text_encoder_2"),
                 Sampling(negative_prompt=False, flow_matching=True, max_sequence_length=512, pixel_multiple=16,
                          resolution_shift=True),
                 blocks=(BlockFamily("double", "transformer_blocks", 19),
                         BlockFamily("single", "single_transformer_blocks", 38))),
    # SD3.5: CLIP ViT-L, OpenCLIP ViT-bigG and T5-XXL; classifier-free guidance with a negative prompt.
    "sd3": Arch("sd3", "SD3.5", "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel",
                ("text_encoder", "text_encoder_2", "text_encoder_3"),
                Sampling(flow_matching=True, max_sequence_length=256, pixel_multiple=16),
                blocks=(BlockFamily("joint", "transformer_blocks", 38),)),
}
ARCH_NAMES = tuple(ARCHES)
UNET_ARCH_NAMES = tuple(name for name, arch in ARCHES.items() if arch.denoiser == "unet")
"""The UNet architectures: the ones with SGM block numbering and A1111 block weights."""
