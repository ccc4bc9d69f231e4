"""Run by test_bridge.py with ComfyUI's Python, cwd at the ComfyUI folder: where the bridge puts every
module a LoRA can target on full-size SD1.5, SDXL, Flux dev and SD3.5 Large, with ComfyUI's own key
maps on ComfyUI's own models, built on the meta device (names and shapes only, no memory, no weights).

For each architecture, the denoiser: the diffusers model at the real model's config on the meta device (its
LoRA-targetable modules: `lora.match.base_spec`), its state dict renamed to the original layout
(`bases.ldm_keys` / `bases.dit_file`), ComfyUI's detection of that state dict
(`comfy.model_detection.model_config_from_unet`), ComfyUI's model from it, its key map, and
`comfy_bridge.plan_patches` over every module at strength 1; and the text encoders: the transformers
models at the real sizes against ComfyUI's CLIP model of that architecture. Prints JSON: per
architecture and part the ComfyUI class, the module count, the modules placed and the first unmatched.
"""

import json
import sys

sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, ".")

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import comfy.lora  # noqa: E402
import comfy.model_detection  # noqa: E402
import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from comfy import sd1_clip, sdxl_clip  # noqa: E402
from comfy.text_encoders import flux as flux_te  # noqa: E402
from comfy.text_encoders import sd3_clip  # noqa: E402

from loraloom.bases import dit_file, ldm_keys  # noqa: E402
from loraloom.lora.match import base_spec  # noqa: E402
from loraloom.nodes.comfy_bridge import plan_patches  # noqa: E402

SD15 = {"cross_attention_dim": 768, "attention_head_dim": 8}
SDXL = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128}
FLUX = {"guidance_embeds": True}
SD35 = {"num_layers": 38, "attention_head_dim": 64, "num_attention_heads": 38, "caption_projection_dim": 2432,
        "pooled_projection_dim": 2048, "joint_attention_dim": 4096, "out_channels": 16, "pos_embed_max_size": 192,
        "qk_norm": "rms_norm", "sample_size": 128}
ARCHES = {"sd15": ("UNet2DConditionModel", SD15), "sdxl": ("UNet2DConditionModel", SDXL),
          "flux": ("FluxTransformer2DModel", FLUX), "sd3": ("SD3Transformer2DModel", SD35)}

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}
T5 = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64, "feed_forward_proj": "gated-gelu"}
TEXT = {"sd15": (sd1_clip.SD1ClipModel, {"text_encoder": ("CLIPTextModel", CLIP_L)}),
        "sdxl": (sdxl_clip.SDXLClipModel, {"text_encoder": ("CLIPTextModel", CLIP_L),
                                           "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G)}),
        "flux": (flux_te.FluxClipModel, {"text_encoder": ("CLIPTextModel", CLIP_L),
                                         "text_encoder_2": ("T5EncoderModel", T5)}),
        "sd3": (sd3_clip.SD3ClipModel, {"text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
                                        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
                                        "text_encoder_3": ("T5EncoderModel", T5)})}


def text_encoders(parts: dict) -> dict:
    models = {}
    for component, (cls_name, config) in parts.items():
        cls = getattr(transformers, cls_name)
        config_cls = transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig
        with torch.device("meta"):
            models[component] = cls(config_cls(**config))
    return models


report = {}
for arch, (cls_name, config) in ARCHES.items():
    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        ours = cls(**config)
    component = "unet" if cls_name.startswith("UNet") else "transformer"
    spec = base_spec({component: ours})
    state = ours.state_dict()
    if component == "unet":
        original = ldm_keys.unet_to_original(state, ours.config)
        prefix = "model.diffusion_model."
    else:
        original, prefix = dit_file.to_original(state, arch), ""
    model_config = comfy.model_detection.model_config_from_unet(original, prefix)
    model = model_config.get_model(original, prefix, device="meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    modules = [(component, path, tuple(m.shape)) for path, m in spec.components[component].items()]
    plan = plan_patches(modules, key_map, shapes, {}, 1.0, 1.0, with_clip=False)
    report[arch] = {"model": type(model_config).__name__, "modules": len(modules),
                    "placed": sum(plan.applied.values()), "unmatched": plan.unmatched[:10],
                    "unmatched_count": len(plan.unmatched)}

    comfy_cls, parts = TEXT[arch]
    with torch.device("meta"):
        clip = comfy_cls(device="meta")
    key_map = comfy.lora.model_lora_keys_clip(clip, {})
    shapes = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    spec = base_spec(text_encoders(parts))
    modules = [(c, path, tuple(m.shape)) for c in parts for path, m in spec.components[c].items()]
    plan = plan_patches(modules, key_map, shapes, {}, 1.0, 1.0, with_clip=True)
    report[arch + " text"] = {"model": comfy_cls.__name__, "modules": len(modules),
                              "placed": sum(plan.applied.values()), "unmatched": plan.unmatched[:10],
                              "unmatched_count": len(plan.unmatched)}
print(json.dumps(report))
