"""Built-in tiny base models: real diffusers pipelines built offline from small configs.

`tiny-sd15` and `tiny-sdxl` are StableDiffusionPipeline / StableDiffusionXLPipeline instances whose
UNets mirror the real block structure (block types and counts, layers_per_block 2, attentions where
the real models have them, transformer layers growing with depth on SDXL) at tiny widths. So every
module path a real LoRA file names (down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q,
kohya's input_blocks_4_1 ...) exists here, and block-weight maps see the real layout. Only the
tensor shapes are tiny (a few MB), which is what lets the tests sample a 64 px image in a fraction of a second.

`tiny-flux` (FluxPipeline: 19 double-stream + 38 single-stream blocks, guidance embedding as in
Flux dev, CLIP-L + T5 text encoders) and `tiny-sd3` (StableDiffusion3Pipeline: 38 joint blocks with
RMS q/k norms as in SD3.5 Large, CLIP-L + CLIP-G + T5) do the same for the DiTs: real block and
text-encoder layer counts, 16-channel VAEs with the real latent scale and shift, the real
flow-matching scheduler configs, tiny widths. Their T5 tokenizer is a Unigram vocabulary built in
memory, like the CLIP one.

Weights come from a seeded build inside `torch.random.fork_rng`, so two builds are bit-identical and
the caller's global RNG state is neither used nor changed. Bump a preset's `version` whenever
its config or init changes: the version is part of the cache fingerprint.

`tiny-sdxl-shapes` is the one trained preset: the tiny-sdxl architecture whose weights were trained
by bases.training on generated pictures of shapes, shipped as bases/weights/tiny-sdxl-shapes.safetensors
(fp16) and loaded over the seeded build; its fingerprint includes that file's content hash.

Importing this module imports no torch (listing PRESETS is what validation needs); building does.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..graph_runtime import file_fingerprint
from ..lora.arches import ARCHES
from .arch import BaseModelError

if TYPE_CHECKING:
    import torch

# Real CLIP ids are 49406/49407 (vocab 49408); ours follow the tiny byte-level vocab built below.
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# A few merges so the tokenizer does real BPE work, not only byte fallback; results join the vocab.
_MERGES = (("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>"))
_MAX_TOKENS = 77  # real CLIP context length: prompt handling (truncation, padding) behaves as in SD

SCHEDULER_CONFIG: dict[str, Any] = {
    # Stable Diffusion's training schedule; Euler is SDXL's shipped default and needs no extra files.
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable character table, used by the ByteLevel pre-tokenizer.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _tokenizer_vocab() -> dict[str, int]:
    symbols = sorted(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols] + [a + b for a, b in _MERGES] + [_BOS, _EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab


_VOCAB = _tokenizer_vocab()


def build_tokenizer(pad_token: str = _EOS):
    """A CLIPTokenizer with a byte-level vocab, built in memory (no files, no hub)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=dict(_VOCAB),
        merges=list(_MERGES),  # transformers 5 needs (a, b) tuples here; strings raise TypeError
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_EOS,
        pad_token=pad_token,
        model_max_length=_MAX_TOKENS,
    )


# T5 (sentencepiece Unigram): <pad> 0, </s> 1, <unk> 2, then pieces with their log-probabilities.
# Whole words score above word-initial letters, which score above bare characters, so the tokenizer
# does real segmentation work; anything else (non-ASCII) becomes <unk>.
_T5_WORDS = ("the", "a", "of", "and", "photo", "cat", "dog", "red", "blue", "circle", "square", "striped")
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()"
_T5_VOCAB = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
             + [("\u2581" + w, -2.0) for w in _T5_WORDS]
             + [("\u2581" + c, -6.0) for c in _T5_CHARS]
             + [(c, -8.0) for c in _T5_CHARS])


def build_t5_tokenizer(max_length: int):
    """A T5 tokenizer (Unigram, as sentencepiece's) built in memory, no files, no hub; `max_length`
    is its model_max_length (the pipelines pass their own max_sequence_length anyway)."""
    from transformers import T5Tokenizer

    # extra_ids=0: the 100 <extra_id_N> sentinels are for T5's span-corruption training only
    return T5Tokenizer(vocab=list(_T5_VOCAB), extra_ids=0, model_max_length=max_length)


def _vae_config(scaling_factor: float, force_upcast: bool, latent_channels: int = 4,
                shift_factor: float | None = None) -> dict[str, Any]:
    # Four blocks keep the real x8 latent scale; the 2-block VAE of diffusers' tests gives x2 and
    # makes the UNet run on 4x more positions (3-9x slower).
    dit = {} if shift_factor is None else {
        # the Flux / SD3 VAEs: 16 latent channels, latents shifted then scaled, no quant convs
        "shift_factor": shift_factor, "use_quant_conv": False, "use_post_quant_conv": False}
    return {
        **dit,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 32, 32],
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": scaling_factor,  # the real models' values
        "force_upcast": force_upcast,
    }


def _clip_text_config(
    hidden_size: int, num_layers: int, hidden_act: str, projection_dim: int | None = None
) -> dict[str, Any]:
    # Layer counts are the real ones, so text-encoder LoRA keys up to layers.11 (CLIP-L) or
    # layers.31 (OpenCLIP bigG) have a module to land on; only the width is tiny.
    config = {
        "vocab_size": len(_VOCAB),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 4,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": _MAX_TOKENS,
        "hidden_act": hidden_act,
        # CLIP pools the hidden state at the first end token, found by this id
        "bos_token_id": _VOCAB[_BOS],
        "eos_token_id": _VOCAB[_EOS],
        "pad_token_id": _VOCAB[_EOS],
    }
    if projection_dim is not None:
        config["projection_dim"] = projection_dim
    return config


TEXT_PROJECTION_SDXL = 32
TIME_EMBED_SDXL = 8
TEXT_SD15 = _clip_text_config(32, 12, "quick_gelu")  # real: CLIP ViT-L, 768 wide, 12 layers
TEXT_SDXL_1 = _clip_text_config(32, 12, "quick_gelu")  # real: CLIP ViT-L, 768 wide, 12 layers
# real: OpenCLIP bigG, 1280 wide, 32 layers. It must be wider than encoder 1: diffusers' single-file
# loader tells the two SDXL encoders apart by width, and a LoRA aimed at the wrong one fails on shape.
TEXT_SDXL_2 = _clip_text_config(48, 32, "gelu", projection_dim=TEXT_PROJECTION_SDXL)

def _block_layout(arch: str) -> dict[str, Any]:
    """The UNet config fields that the architecture's block layout (`lora.arches`) fixes."""
    layout = ARCHES[arch]
    return {
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
        "layers_per_block": layout.layers_per_block,
    }


UNET_SD15: dict[str, Any] = {
    # Real SD1.5: 3 CrossAttnDown + 1 Down, cross-attention mid block, 1 Up + 3 CrossAttnUp,
    # block_out_channels (320, 640, 1280, 1280), 8 heads, conv proj_in/out. Widths here are 1/40:
    # time is per-module overhead at these sizes, so narrower only saves megabytes.
    "sample_size": 8,  # latent size: the pipelines' default image is 8 * 8 = 64 px
    "in_channels": 4,
    "out_channels": 4,
    **_block_layout("sd15"),
    "block_out_channels": [8, 16, 32, 32],
    "norm_num_groups": 8,
    "cross_attention_dim": TEXT_SD15["hidden_size"],
    "attention_head_dim": 4,  # diffusers' SD1.5 name for the head count (real: 8)
    "use_linear_projection": False,
}

UNET_SDXL: dict[str, Any] = {
    # Real SDXL: Down + 2 CrossAttnDown, transformer_layers_per_block (1, 2, 10), mid with 10,
    # block_out_channels (320, 640, 1280), linear proj_in/out, "text_time" added conditioning.
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    **_block_layout("sdxl"),
    "block_out_channels": [8, 16, 32],
    "norm_num_groups": 8,
    "transformer_layers_per_block": [1, 2, 10],
    # both encoders' hidden states, concatenated per token
    "cross_attention_dim": TEXT_SDXL_1["hidden_size"] + TEXT_SDXL_2["hidden_size"],
    "attention_head_dim": [2, 2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_SDXL,
    # six micro-conditioning numbers (original size, crop, target size), each time-embedded,
    # plus the pooled projection of text encoder 2
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED_SDXL + TEXT_PROJECTION_SDXL,
}

VAE_SD15 = _vae_config(0.18215, force_upcast=False)
VAE_SDXL = _vae_config(0.13025, force_upcast=True)  # the real SDXL VAE overflows in fp16
# tiny-sdxl-shapes: 1 / std of its trained VAE's latents, as bases.training measured it (and wrote it
# into the weights file's metadata, which build_pipeline checks against this)
SHAPES_VAE_SCALING = 0.27681
# What training needed beyond tiny-sdxl. GroupNorm with one channel per group (tiny-sdxl's 8 groups
# on 8 channels) normalises each channel of each picture on its own, which wipes out flat colour: the
# first VAE trained that way gave shapes back in one brown whatever their colour. 4 channels per group
# (the real VAE has 128 / 32) keeps it; fewer groups change no weight's shape, so LoRAs and
# block-weight maps of tiny-sdxl fit this UNet unchanged.
VAE_SHAPES = {**_vae_config(SHAPES_VAE_SCALING, force_upcast=True), "block_out_channels": [16, 32, 32, 32],
              "norm_num_groups": 4}
UNET_SHAPES = {**UNET_SDXL, "norm_num_groups": 2}

# Flux and SD3.5. Real T5-XXL: 4096 wide, 24 layers, 64 heads of 64, gated-GELU feed-forward 10240.
# SD3 pads the CLIP-L + CLIP-G hidden states (32 + 48 here) to T5's width, so it must be at least 80.
T5_WIDTH = 96
TEXT_T5: dict[str, Any] = {
    "vocab_size": len(_T5_VOCAB),
    "d_model": T5_WIDTH,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 24,
    "num_heads": 4,
    "feed_forward_proj": "gated-gelu",  # T5 v1.1, as Flux's and SD3's encoders
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
_FLUX_BLOCKS = {family.name: family.count for family in ARCHES["flux"].blocks}
TRANSFORMER_FLUX: dict[str, Any] = {
    # Real Flux dev: 24 heads of 128 (3072 wide), rope axes (16, 56, 56), T5 4096 -> context,
    # CLIP-L pooled 768 -> the time/guidance/text vector. Here 2 heads of 16.
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels packed in 2x2 patches
    "num_layers": _FLUX_BLOCKS["double"],
    "num_single_layers": _FLUX_BLOCKS["single"],
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": T5_WIDTH,
    "pooled_projection_dim": TEXT_SD15["hidden_size"],
    "guidance_embeds": True,  # dev's distilled guidance (schnell has none)
    "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
}
TEXT_SD3_1 = {**TEXT_SDXL_1, "projection_dim": TEXT_PROJECTION_SDXL}  # CLIP-L, with its projection in SD3
TEXT_SD3_2 = TEXT_SDXL_2  # OpenCLIP bigG
TRANSFORMER_SD3: dict[str, Any] = {
    # Real SD3.5 Large: 38 joint blocks of 38 heads of 64 (2432 wide), RMS q/k norms, 2x2 patches,
    # positional embedding up to 192 patches a side. Here 4 heads of 8.
    "sample_size": 8,  # latent size: the pipeline's default image is 8 * 8 = 64 px
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": ARCHES["sd3"].blocks[0].count,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": T5_WIDTH,
    "caption_projection_dim": 32,  # = heads x head dim
    "pooled_projection_dim": 2 * TEXT_PROJECTION_SDXL,  # CLIP-L and CLIP-G pooled projections
    "pos_embed_max_size": 96,  # 96 patches of 16 px: images up to 1536 px a side
    "qk_norm": "rms_norm",
    "dual_attention_layers": [],  # SD3.5 Medium's MMDiT-X layers; Large has none
}
VAE_FLUX = _vae_config(0.3611, force_upcast=True, latent_channels=16, shift_factor=0.1159)
VAE_SD3 = _vae_config(1.5305, force_upcast=True, latent_channels=16, shift_factor=0.0609)
SCHEDULER_FLUX: dict[str, Any] = {
    # Flux dev's: the sigma shift grows with the image's token count (resolution-dependent shift)
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SCHEDULER_SD3: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3.5 Large's

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# the models a weights file holds, keyed "<component>.<parameter name>"
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Preset:
    """One built-in base model: its name, architecture, version, seed and component configs
    (the denoiser's: "unet" or "transformer"; "vae", the text encoders', "scheduler"). `weights`: a file
    in bases/weights/ holding trained weights for every model (see load_weights); None: the seeded
    init is the model."""

    name: str
    arch: str
    version: int
    seed: int
    description: str
    configs: dict[str, dict[str, Any]]
    weights: str | None = None

    @property
    def weights_path(self) -> Path | None:
        """The shipped weights file, or None for a preset of seeded random weights."""
        return WEIGHTS_DIR / self.weights if self.weights else None

    @property
    def fingerprint(self) -> str:
        """Stable identity for caches: changes exactly when the preset's weights can change (for a
        trained preset, the weights file's content hash is part of it)."""
        if self.weights_path is None:
            return f"preset:{self.name}@{self.version}"
        return f"preset:{self.name}@{self.version}+weights:sha256:{file_fingerprint(_existing(self.weights_path))}"


def _build_sd15(configs: dict[str, dict[str, Any]]):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Construction order draws the weights from the seeded RNG: changing it changes every weight
    # (bump the preset version then).
    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(configs: dict[str, dict[str, Any]]):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**configs["unet"])  # same order rule as _build_sd15
    vae = AutoencoderKL(**configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(pad_token="!"),  # real SDXL's second tokenizer pads with "!"
        unet=unet,
        scheduler=EulerDiscreteScheduler(**configs["scheduler"]),
        force_zeros_for_empty_prompt=True,
    )


def _build_flux(configs: dict[str, dict[str, Any]]):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(**configs["transformer"])  # same order rule as _build_sd15
    vae = AutoencoderKL(**configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    text_encoder_2 = T5EncoderModel(T5Config(**configs["text_encoder_2"]))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**configs["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_t5_tokenizer(ARCHES["flux"].sampling.max_sequence_length),
        transformer=transformer,
    )


def _build_sd3(configs: dict[str, dict[str, Any]]):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    transformer = SD3Transformer2DModel(**configs["transformer"])  # same order rule as _build_sd15
    vae = AutoencoderKL(**configs["vae"])
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    text_encoder_3 = T5EncoderModel(T5Config(**configs["text_encoder_3"]))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**configs["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tokenizer(pad_token="!"),  # as SDXL's OpenCLIP tokenizer
        text_encoder_3=text_encoder_3,
        tokenizer_3=build_t5_tokenizer(ARCHES["sd3"].sampling.max_sequence_length),
    )


_BUILDERS = {"sd15": _build_sd15, "sdxl": _build_sdxl, "flux": _build_flux, "sd3": _build_sd3}

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "tiny-sd15", "sd15", 1, 1500, "StableDiffusionPipeline, real SD1.5 block layout, tiny widths",
            {"unet": UNET_SD15, "vae": VAE_SD15, "text_encoder": TEXT_SD15, "scheduler": SCHEDULER_CONFIG},
        ),
        Preset(
            "tiny-sdxl", "sdxl", 1, 1000, "StableDiffusionXLPipeline, real SDXL block layout, tiny widths",
            {
                "unet": UNET_SDXL,
                "vae": VAE_SDXL,
                "text_encoder": TEXT_SDXL_1,
                "text_encoder_2": TEXT_SDXL_2,
                "scheduler": SCHEDULER_CONFIG,
            },
        ),
        Preset(
            "tiny-sdxl-shapes", "sdxl", 1, 1000,
            "tiny-sdxl trained on generated shapes (\"a red circle, striped\"): 64 px, by bases.training",
            {
                "unet": UNET_SHAPES,
                "vae": VAE_SHAPES,
                "text_encoder": TEXT_SDXL_1,
                "text_encoder_2": TEXT_SDXL_2,
                "scheduler": SCHEDULER_CONFIG,
            },
            weights="tiny-sdxl-shapes.safetensors",
        ),
        Preset(
            "tiny-flux", "flux", 1, 2000,
            "FluxPipeline, real Flux dev layout (19 double + 38 single blocks, guidance embedding), tiny widths",
            {
                "transformer": TRANSFORMER_FLUX,
                "vae": VAE_FLUX,
                "text_encoder": TEXT_SD15,
                "text_encoder_2": TEXT_T5,
                "scheduler": SCHEDULER_FLUX,
            },
        ),
        Preset(
            "tiny-sd3", "sd3", 1, 3000,
            "StableDiffusion3Pipeline, real SD3.5 Large layout (38 joint blocks), three text encoders, tiny widths",
            {
                "transformer": TRANSFORMER_SD3,
                "vae": VAE_SD3,
                "text_encoder": TEXT_SD3_1,
                "text_encoder_2": TEXT_SD3_2,
                "text_encoder_3": TEXT_T5,
                "scheduler": SCHEDULER_SD3,
            },
        ),
    )
}


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise BaseModelError(
            f"the weights file {path} of a built-in preset is missing.", file=path, kind="not_found",
            fix="reinstall LoRA Loom, or restore the file from the repository (bases/weights/)"
        )
    return path


def load_weights(pipe, path: str | Path):
    """Load a weights file (as bases.training.save_base writes it: every weight of the unet, vae and
    text encoders in fp16, keyed "<component>.<name>") into `pipe`, strictly: a missing or extra
    key, or a latent scale other than the VAE config's, is an error. Returns `pipe`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        scaling = (f.metadata() or {}).get("vae_scaling_factor")
    if scaling is None or abs(float(scaling) - pipe.vae.config.scaling_factor) > 1e-9:
        raise BaseModelError(f"{path}: its VAE latent scale {scaling} is not the config's "
                             f"{pipe.vae.config.scaling_factor}.", file=path, value=scaling,
                             limit=pipe.vae.config.scaling_factor)
    for component in WEIGHT_COMPONENTS:
        prefix = f"{component}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        getattr(pipe, component).load_state_dict(state, strict=True)  # casts to the model's dtype
    return pipe


def preset_names(denoiser: str | None = None) -> tuple[str, ...]:
    """The presets' names, all or those whose architecture's denoiser is `denoiser` ("unet",
    "transformer")."""
    return tuple(name for name, preset in PRESETS.items()
                 if denoiser is None or ARCHES[preset.arch].denoiser == denoiser)


def get_preset(name: str) -> Preset:
    """The Preset called `name`; unknown names raise ValueError listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise BaseModelError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def build_skeleton(name: str):
    """Preset `name`'s pipeline at its seeded init (fp32, CPU, training mode), without any shipped
    weights: what build_pipeline starts from, and what bases.training trains."""
    import torch

    preset = get_preset(name)
    # devices=[]: only the CPU generator is forked; init runs on the CPU and CUDA state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        # deep copies: diffusers and transformers keep (and may edit) the dicts they are given
        return _BUILDERS[preset.arch](copy.deepcopy(preset.configs))


def build_pipeline(name: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto"):
    """Build preset `name` (see PRESETS) as a fresh diffusers pipeline.

    Every call returns new, bit-identical weights: they are drawn in fp32 on the CPU from the
    preset's seed inside `torch.random.fork_rng`, so neither an earlier `torch.manual_seed` nor the
    device changes them, and the caller's RNG state is left as it was; a trained preset then loads
    its shipped weights file over them (every weight, strictly). The pipeline is then moved
    to `device` and cast to `dtype` (see bases.devices for the accepted values).
    """
    import torch

    from . import devices

    preset = get_preset(name)
    torch_dtype, torch_device = devices.resolve(dtype, device)
    weights = _existing(preset.weights_path) if preset.weights_path is not None else None
    pipe = build_skeleton(name)
    if weights is not None:
        load_weights(pipe, weights)
    # Constructors leave modules in training mode; from_pretrained returns them in eval mode, and
    # so must we, or a peft LoRA with lora_dropout > 0 would drop activations while sampling.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    if torch_dtype == torch.float32:
        # already fp32; passing dtype anyway makes diffusers 0.42 warn about "modules that should
        # be kept in float32: []" on every build
        return pipe.to(device=torch_device)
    return pipe.to(device=torch_device, dtype=torch_dtype)


def preset_configs(name: str) -> dict[str, dict[str, Any]]:
    """A copy of the component configs of preset `name` (by pipeline component: the denoiser, "vae",
    the text encoders, "scheduler"), e.g. to build one component alone."""
    return copy.deepcopy(get_preset(name).configs)

