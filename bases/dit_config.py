"""The diffusers config of a Flux or SD3.5 transformer found in its single file's header: the first
half of config="auto" for the DiT bases (the text encoders, VAE and tokenizers are in other files).

Read from the tensors' shapes and key names alone (original layout: Black Forest Labs'
``double_blocks`` / ``single_blocks``, Stability's MMDiT ``joint_blocks``; bare or under ComfyUI's
``model.diffusion_model.``, where an all-in-one file keeps its VAE and text encoders under other
prefixes, which are ignored here). What the shapes tell:

- Flux: width and input channels (``img_in``), T5 width (``txt_in``), pooled CLIP width
  (``vector_in.in_layer``), head width (``double_blocks.0.img_attn.norm.query_norm.scale``), block
  counts, guidance embedding (dev has ``guidance_in``, schnell none), output channels (``final_layer``);
- SD3.5: width, input channels and patch size (``x_embedder.proj``), positional table size
  (``pos_embed``), T5 width (``context_embedder``), pooled width (``y_embedder.mlp.0``), head width
  (the RMS q/k norm ``ln_q``), block count, MMDiT-X dual-attention blocks (``x_block.attn2``).

What no shape tells is taken from the family (the published diffusers configs of FLUX.1-dev /
schnell and SD3.5 Large / Medium): Flux's rope axes (16, 56, 56), which only fit heads of 128, and
SD3's default latent size 128 and, without q/k norms, heads of 64. A model whose shapes do not fit
those values is refused (kind "config_underivable") rather than guessed. Nothing here imports torch.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .arch import UNET_PREFIX, VAE_PREFIX, BaseModelError, arch_from_transformer_config
from .auto_config import HeaderShapes, clip_text_config, vae_config

FLUX_ROPE_AXES = {128: [16, 56, 56]}  # head width -> rope axes of the published Flux models
SD3_SAMPLE_SIZE = 128  # SD3.5 Large and Medium: 1024 px images, 8x VAE
SD3_HEAD_WIDTH = 64  # every published MMDiT (SD3 Medium, SD3.5 Large / Medium)
CLASSES = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel"}
_BLOCK_KEY = {"flux": "double_blocks.", "sd3": "joint_blocks."}
_FIX = "choose a config folder: the diffusers folder of the same model (its transformer weights may be absent)"


def _prefix(shapes: Mapping[str, Sequence[int]], arch: str) -> str:
    """"model.diffusion_model." when the transformer is under ComfyUI's prefix, else "" (bare BFL / MMDiT)."""
    block = _BLOCK_KEY[arch]
    return UNET_PREFIX if any(k.startswith(UNET_PREFIX + block) for k in shapes) else ""



def _underivable(what: str, value: Any, limit: Any, where: str) -> BaseModelError:
    return BaseModelError(f"{what} is {value!r}; the config value that no shape tells is known only for {limit!r} "
                          "(the published models), so this config cannot be derived.", file=where, value=value,
                          limit=limit, kind="config_underivable", fix=_FIX)


def _flux(h: HeaderShapes) -> dict[str, Any]:
    inner, in_channels = h("img_in.weight")
    head = h("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if inner % head:
        raise _underivable("the width / head width", f"{inner} / {head}", "a whole number of heads", h.where)
    if head not in FLUX_ROPE_AXES:
        raise _underivable("the head width", head, sorted(FLUX_ROPE_AXES), h.where)
    config = {
        "_class_name": CLASSES["flux"],
        "patch_size": 1,  # BFL packs 2x2 latent patches outside the model: img_in takes them flat
        "in_channels": in_channels,
        "num_layers": len(h.indices(r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(h.indices(r"single_blocks\.(\d+)\.")),
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": h("txt_in.weight")[1],
        "pooled_projection_dim": h("vector_in.in_layer.weight")[1],
        "guidance_embeds": h.has("guidance_in.in_layer.weight"),
        "axes_dims_rope": list(FLUX_ROPE_AXES[head]),
    }
    out_channels = h("final_layer.linear.weight")[0]
    if out_channels != in_channels:  # the published configs leave it unset (= in_channels)
        config["out_channels"] = out_channels
    return config


def _sd3(h: HeaderShapes) -> dict[str, Any]:
    inner, in_channels, patch, _ = h("x_embedder.proj.weight")
    positions = h("pos_embed")[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise _underivable("the positional table's length", positions, "a square number", h.where)
    qk_norm = h.has("joint_blocks.0.x_block.attn.ln_q.weight")
    head = h("joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk_norm else SD3_HEAD_WIDTH
    if inner % head:
        raise _underivable("the width / head width", f"{inner} / {head}", "a whole number of heads", h.where)
    final = h("final_layer.linear.weight")[0]
    if final % (patch * patch):
        raise _underivable("the final layer's rows", final, f"a multiple of patch size {patch} squared", h.where)
    return {
        "_class_name": CLASSES["sd3"],
        "sample_size": SD3_SAMPLE_SIZE,
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": final // (patch * patch),
        "num_layers": len(h.indices(r"joint_blocks\.(\d+)\.")),
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": h("context_embedder.weight")[1],
        "caption_projection_dim": h("context_embedder.weight")[0],
        "pooled_projection_dim": h("y_embedder.mlp.0.weight")[1],
        "pos_embed_max_size": side,
        "qk_norm": "rms_norm" if qk_norm else None,
        "dual_attention_layers": h.indices(r"joint_blocks\.(\d+)\.x_block\.attn2\."),
    }


def transformer_config(shapes: Mapping[str, Sequence[int]], arch: str, where: str) -> dict[str, Any]:
    """The diffusers ``transformer/config.json`` of the ``arch`` ("flux" or "sd3") transformer whose
    tensors' ``shapes`` (original key -> shape) a single file ``where`` holds. Raises BaseModelError
    (kind "config_underivable", naming the key or value) where the shapes do not give a config, and
    "unsupported_arch" for Flux Fill / Depth / Canny and other variants with extra input channels."""
    if arch not in CLASSES:
        raise BaseModelError(f"{arch!r} is not a transformer architecture.", file=where, value=arch,
                             limit=tuple(CLASSES), kind="unsupported_arch")
    header = HeaderShapes(shapes, _prefix(shapes, arch), where, f"{arch} transformer",
                          family="Flux / SD3.5 transformer", fix=_FIX)
    config = _flux(header) if arch == "flux" else _sd3(header)
    arch_from_transformer_config(config["_class_name"], config, where)  # refuses Fill / Depth and the like
    return config


# T5 v1.1 as Flux and SD3.5 ship it (google/t5-v1_1-xxl): what no shape of its encoder tells.
T5_FAMILY = {"feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "relative_attention_max_distance": 128,
             "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "")  # an all-in-one file's, then a t5xxl file's (HF names)


def t5_config(shapes: Mapping[str, Sequence[int]], where: str) -> dict[str, Any]:
    """The transformers ``T5EncoderModel`` config.json of the T5 encoder whose tensors' ``shapes`` a
    file ``where`` holds (HF names, as ComfyUI's t5xxl_*.safetensors ship them; under
    ``text_encoders.t5xxl.transformer.`` in an all-in-one file). Raises BaseModelError naming the
    missing key, and for a non-gated (T5 v1.0) feed-forward, which no Flux / SD3.5 uses."""
    prefix = next((p for p in T5_PREFIXES if p + "shared.weight" in shapes), "")
    h = HeaderShapes(shapes, prefix, where, "T5 encoder", family="T5 encoder file", fix=_FIX)
    vocab, width = h("shared.weight")
    buckets, heads = h("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = h("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    if not h.has("encoder.block.0.layer.1.DenseReluDense.wi_0.weight"):
        raise _underivable("the feed-forward", "not gated (no wi_0)", "gated-gelu (T5 v1.1)", where)
    if inner % heads:
        raise _underivable("the attention width / heads", f"{inner} / {heads}", "a whole head width", where)
    layers = len(h.indices(r"encoder\.block\.(\d+)\."))
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": vocab, "d_model": width,
            "d_kv": inner // heads, "d_ff": h("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
            "num_layers": layers, "num_decoder_layers": layers, "num_heads": heads,
            "relative_attention_num_buckets": buckets, **T5_FAMILY}


# The CLIP encoders' files (ComfyUI's text_encoders folder: HF names under "text_model."; an
# all-in-one SD3.5 file keeps them under "text_encoders.<name>.transformer.") and what no shape tells:
# CLIP-L's quick_gelu, OpenCLIP bigG's gelu.
CLIP_ACTIVATIONS = {"clip_l": "quick_gelu", "clip_g": "gelu"}


def clip_config(shapes: Mapping[str, Sequence[int]], which: str, where: str) -> dict[str, Any]:
    """The transformers CLIP text config.json of the ``which`` ("clip_l" or "clip_g") encoder whose
    tensors' ``shapes`` a file ``where`` holds: ``CLIPTextModelWithProjection`` when the file has
    ``text_projection.weight`` (SD3.5's encoders; its rows are the projection width), else
    ``CLIPTextModel`` (Flux's CLIP-L). Raises BaseModelError naming a missing key."""
    if which not in CLIP_ACTIVATIONS:
        raise BaseModelError(f"{which!r} is not a CLIP encoder of Flux / SD3.5.", file=where, value=which,
                             limit=tuple(CLIP_ACTIVATIONS), kind="unsupported_arch")
    outer = next((p for p in (f"text_encoders.{which}.transformer.", "")
                  if p + "text_model.embeddings.token_embedding.weight" in shapes), "")
    h = HeaderShapes(shapes, outer + "text_model.", where, f"{which} text encoder", family="CLIP text encoder file",
                     fix=_FIX)
    config = {**clip_text_config(h, where), "hidden_act": CLIP_ACTIVATIONS[which]}
    if outer + "text_projection.weight" in shapes:
        config.update(architectures=["CLIPTextModelWithProjection"],
                      projection_dim=int(shapes[outer + "text_projection.weight"][0]))
    return config


# The Flux / SD3.5 VAE (16 latent channels, no quant convs: the shapes tell) and what no shape tells,
# from the published vae/config.json of FLUX.1-dev and SD3.5 Large.
VAE_FAMILY = {"flux": {"vae_sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "force_upcast": True},
              "sd3": {"vae_sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609, "force_upcast": True}}


def dit_vae_config(shapes: Mapping[str, Sequence[int]], arch: str, where: str) -> dict[str, Any]:
    """The diffusers AutoencoderKL config.json of the ``arch`` ("flux" or "sd3") VAE whose tensors'
    ``shapes`` a file ``where`` holds: LDM names, bare (Flux's ae.safetensors) or under
    ``first_stage_model.`` (an all-in-one file). Raises BaseModelError naming a missing key."""
    if arch not in VAE_FAMILY:
        raise BaseModelError(f"{arch!r} is not a transformer architecture.", file=where, value=arch,
                             limit=tuple(VAE_FAMILY), kind="unsupported_arch")
    prefix = VAE_PREFIX if VAE_PREFIX + "decoder.conv_in.weight" in shapes else ""
    return vae_config(HeaderShapes(shapes, prefix, where, f"{arch} VAE", family="VAE file", fix=_FIX),
                      VAE_FAMILY[arch], where)
