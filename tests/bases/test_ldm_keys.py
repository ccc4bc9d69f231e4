"""bases/ldm_keys.py: diffusers key names to the original LDM / SGM single-file layout, checked
key for key and bit for bit against diffusers' own single-file converters."""
import pytest
import torch
from diffusers.loaders import single_file_utils
from safetensors import safe_open

from loraloom.bases import ldm_keys, presets
from loraloom.bases.arch import OPEN_CLIP_PREFIX, TEXT_PREFIXES
from loraloom.bases.ldm_keys import original_unet_key

# Keys real single-file checkpoints have (original LDM / SGM names; shapes differ, names do not).
REAL_SD15_KEYS = [
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.middle_block.2.emb_layers.1.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.mid.block_2.conv2.weight",
    "first_stage_model.post_quant_conv.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
]
REAL_SDXL_KEYS = [
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.6.0.op.weight",
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_out.0.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
    "first_stage_model.encoder.mid.attn_1.proj_out.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    "conditioner.embedders.1.model.positional_embedding",
    "conditioner.embedders.1.model.token_embedding.weight",
    "conditioner.embedders.1.model.text_projection",
    "conditioner.embedders.1.model.ln_final.weight",
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.out_proj.weight",
]


@pytest.mark.parametrize("name, real_keys", [("tiny-sd15", REAL_SD15_KEYS), ("tiny-sdxl", REAL_SDXL_KEYS)])
def test_single_file_uses_the_real_key_layout(name, real_keys, tiny_model_files):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    with safe_open(str(tiny_model_files(name)["single_file"]), framework="pt") as handle:
        keys = set(handle.keys())
        missing = [k for k in real_keys if k not in keys]
        assert not missing, f"{name}: single file lacks real checkpoint keys {missing}"
        assert handle.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1], (
            "original VAE attention weights are 1x1 convolutions"
        )
        state = {k: handle.get_tensor(k) for k in keys}
    expected = {"tiny-sd15": "v1", "tiny-sdxl": "xl_base"}[name]
    assert infer_diffusers_model_type(state) == expected, f"diffusers should read {name}'s file as {expected}"


def test_unknown_keys_are_refused_not_dropped():
    with pytest.raises(ValueError, match="UNet key 'foo.weight' has no original single-file name"):
        ldm_keys.unet_to_original({"foo.weight": torch.zeros(1)}, presets.preset_configs("tiny-sd15")["unet"])


def test_kohya_sgm_block_names_map_to_the_same_modules_as_in_real_sdxl():
    config = presets.preset_configs("tiny-sdxl")["unet"]
    # pairs as in real SDXL kohya files (lora_unet_input_blocks_4_1_... = down_blocks.1.attentions.0)
    pairs = {
        "down_blocks.1.attentions.0": "input_blocks.4.1",
        "down_blocks.2.attentions.1": "input_blocks.8.1",
        "mid_block.attentions.0": "middle_block.1",
        "up_blocks.0.attentions.0": "output_blocks.0.1",
        "up_blocks.1.attentions.2": "output_blocks.5.1",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    }
    for diffusers_name, original in pairs.items():
        assert original_unet_key(diffusers_name, config) == original, f"{diffusers_name} should be {original}"


@pytest.mark.parametrize("name", presets.preset_names("unet"))
def test_diffusers_converters_give_every_weight_back_bit_exact(name, tiny_pipeline):
    """Our original-layout dict, read back by the converters from_single_file uses, is the pipeline's
    own state, key for key (nothing dropped, nothing extra) and bit for bit."""
    pipe = tiny_pipeline(name)
    arch = presets.PRESETS[name].arch
    original = ldm_keys.pipeline_to_original(pipe, arch)
    back = {
        "unet": single_file_utils.convert_ldm_unet_checkpoint(original, pipe.unet.config),
        "vae": single_file_utils.convert_ldm_vae_checkpoint(original, pipe.vae.config),
        "text_encoder": single_file_utils.convert_ldm_clip_checkpoint(
            original, remove_prefix=TEXT_PREFIXES[(arch, "text_encoder")].removesuffix("text_model.")
        ),
    }
    if arch == "sdxl":
        back["text_encoder_2"] = single_file_utils.convert_open_clip_checkpoint(
            pipe.text_encoder_2, original, prefix=OPEN_CLIP_PREFIX
        )
    assert set(back) == {c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, c, None)}
    for component, state in back.items():
        # transformers 5 has no text_model. level in CLIPTextModel; the converters may still add it
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
        want = {k.removeprefix("text_model."): v for k, v in getattr(pipe, component).state_dict().items()}
        assert state.keys() == want.keys(), f"{name} {component}: {sorted(set(state) ^ set(want))[:5]}"
        differ = [k for k in want if state[k].shape != want[k].shape or not torch.equal(state[k], want[k])]
        assert not differ, f"{name} {component}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def test_unknown_arch_is_refused(tiny_sd15):
    with pytest.raises(ValueError, match="architecture 'sd2': single-file layout known for sd15, sdxl"):
        ldm_keys.pipeline_to_original(tiny_sd15, "sd2")


def test_open_clip_refuses_keys_it_cannot_name():
    with pytest.raises(ValueError, match="text_encoder_2 key 'pooler.weight' has no OpenCLIP name. Fix:"):
        ldm_keys.open_clip_to_original({"pooler.weight": torch.zeros(1)})
