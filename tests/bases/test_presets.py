"""Built-in tiny presets: deterministic, fast, small, and shaped like the real SD1.5 / SDXL."""
import re

import pytest
import torch

from loraloom.bases import presets
from loraloom.bases.ldm_keys import original_unet_key

# Module paths real LoRA files target (kohya / LyCORIS / diffusers-PEFT files, in diffusers names),
# with the layer type the real tensors imply: 4-D LoRA weights for Conv2d, 2-D for Linear.
LINEAR, CONV = torch.nn.Linear, torch.nn.Conv2d
SD15_UNET_TARGETS = {
    "down_blocks.0.attentions.0.proj_in": CONV,  # SD1.5 projects with 1x1 convolutions
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LINEAR,
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": LINEAR,
    "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0": LINEAR,
    "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj": LINEAR,
    "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2": LINEAR,
    "down_blocks.2.attentions.1.proj_out": CONV,
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": LINEAR,
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k": LINEAR,
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0": LINEAR,
    "up_blocks.3.attentions.2.proj_out": CONV,
    # LoCon / LyCORIS convolution and embedding targets
    "conv_in": CONV,
    "conv_out": CONV,
    "time_embedding.linear_1": LINEAR,
    "down_blocks.0.resnets.0.conv1": CONV,
    "down_blocks.0.resnets.0.time_emb_proj": LINEAR,
    "down_blocks.0.resnets.1.conv2": CONV,
    "down_blocks.1.resnets.0.conv_shortcut": CONV,
    "down_blocks.0.downsamplers.0.conv": CONV,
    "down_blocks.3.resnets.1.conv2": CONV,
    "mid_block.resnets.1.conv1": CONV,
    "up_blocks.0.resnets.2.conv_shortcut": CONV,
    "up_blocks.0.upsamplers.0.conv": CONV,
    "up_blocks.2.upsamplers.0.conv": CONV,
    "up_blocks.3.resnets.2.time_emb_proj": LINEAR,
}
SDXL_UNET_TARGETS = {
    "down_blocks.0.resnets.0.conv1": CONV,
    "down_blocks.0.downsamplers.0.conv": CONV,
    "down_blocks.1.resnets.0.conv_shortcut": CONV,
    "down_blocks.1.attentions.0.proj_in": LINEAR,  # SDXL projects with Linear layers
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": LINEAR,
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k": LINEAR,
    "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_v": LINEAR,
    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj": LINEAR,
    "down_blocks.2.attentions.1.proj_out": LINEAR,
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": LINEAR,
    "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0": LINEAR,
    "up_blocks.0.attentions.0.transformer_blocks.9.attn1.to_out.0": LINEAR,
    "up_blocks.0.attentions.2.transformer_blocks.5.attn2.to_v": LINEAR,
    "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2": LINEAR,
    "up_blocks.1.attentions.2.proj_out": LINEAR,
    "up_blocks.0.upsamplers.0.conv": CONV,
    "up_blocks.1.upsamplers.0.conv": CONV,
    "up_blocks.2.resnets.2.conv2": CONV,
    "time_embedding.linear_2": LINEAR,
    "add_embedding.linear_1": LINEAR,
    "add_embedding.linear_2": LINEAR,
}
# Present in neither real model: a LoRA naming them is for another architecture.
SDXL_ABSENT = ["down_blocks.0.attentions.0", "down_blocks.3", "down_blocks.2.downsamplers.0", "up_blocks.2.attentions.0", "up_blocks.2.upsamplers.0"]
SD15_ABSENT = ["down_blocks.3.attentions.0", "down_blocks.4", "down_blocks.3.downsamplers.0", "up_blocks.0.attentions.0", "up_blocks.3.upsamplers.0", "add_embedding"]

CLIP_L_TARGETS = [f"encoder.layers.{i}.{m}" for i in (0, 11) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
OPEN_CLIP_G_TARGETS = [f"encoder.layers.{i}.{m}" for i in (0, 9, 31) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]

# Original-layout slots holding a transformer: the blocks A1111 block-weight presets name
# (SD1.5: IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03..OUT11; SDXL: IN04 IN05 IN07 IN08 M00 OUT00..OUT05).
ATTENTION_SLOTS = {
    "tiny-sd15": {f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)} | {"middle_block.1"} | {f"output_blocks.{i}.1" for i in range(3, 12)},
    "tiny-sdxl": {f"input_blocks.{i}.1" for i in (4, 5, 7, 8)} | {"middle_block.1"} | {f"output_blocks.{i}.1" for i in range(6)},
}
ATTENTION_SLOTS["tiny-sdxl-shapes"] = ATTENTION_SLOTS["tiny-sdxl"]  # the same UNet, trained


def _weights(pipe):
    return {
        f"{name}.{key}": value
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        for key, value in component.state_dict().items()
    }


def _text_module(encoder, path):
    # transformers 5 flattened CLIPTextModel (no `.text_model`); CLIPTextModelWithProjection keeps it
    root = encoder.text_model if hasattr(encoder, "text_model") else encoder
    return root.get_submodule(path)


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_two_builds_are_bit_identical_whatever_the_global_seed(name):
    torch.manual_seed(123)
    first = _weights(presets.build_pipeline(name, dtype="fp32", device="cpu"))
    torch.manual_seed(456)
    state = torch.random.get_rng_state()
    second = _weights(presets.build_pipeline(name, dtype="fp32", device="cpu"))
    assert torch.equal(state, torch.random.get_rng_state()), "building a preset must not consume the caller's RNG"
    assert first.keys() == second.keys(), "the two builds have different parameter names"
    differing = [key for key in first if not torch.equal(first[key], second[key])]
    assert not differing, f"{name}: weights differ between builds, e.g. {differing[:3]}"


def test_presets_have_distinct_weights_from_each_other():
    sd15 = presets.build_pipeline("tiny-sd15", dtype="fp32", device="cpu")
    sdxl = presets.build_pipeline("tiny-sdxl", dtype="fp32", device="cpu")
    a, b = sd15.vae.encoder.conv_in.weight, sdxl.vae.encoder.conv_in.weight
    assert a.shape == b.shape and not torch.equal(a, b), "presets share a seed: tests could not tell them apart"


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_sample_64px_is_finite_and_repeatable(name, tiny_pipeline, tiny_sample):
    pipe = tiny_pipeline(name)
    image = tiny_sample(pipe)
    assert image.shape == (1, 3, 64, 64), f"{name}: image shape {tuple(image.shape)}, expected (1, 3, 64, 64)"
    assert torch.isfinite(image).all(), f"{name}: image has non-finite values"
    assert image.min() >= 0 and image.max() <= 1, f"{name}: image outside 0..1"
    assert image.std() > 0, f"{name}: image is constant"
    again = tiny_sample(pipe)
    assert torch.equal(image, again), f"{name}: same seed gave a different image"


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_vae_keeps_the_real_x8_latent_scale(name, tiny_pipeline):
    # A wall-clock assertion would be flaky on a shared CPU; this is what keeps sampling fast:
    # a x2 VAE makes the UNet see 16x more positions at the same image size.
    pipe = tiny_pipeline(name)
    assert pipe.vae_scale_factor == 8, f"{name}: VAE scale x{pipe.vae_scale_factor}, real models use x8"


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_presets_stay_small(name, tiny_pipeline):
    size = sum(value.numel() * value.element_size() for value in _weights(tiny_pipeline(name)).values())
    assert size < 16e6, f"{name}: {size / 1e6:.1f} MB of fp32 weights, expected a few MB"


@pytest.mark.parametrize(
    "name, unet_targets, absent",
    [("tiny-sd15", SD15_UNET_TARGETS, SD15_ABSENT), ("tiny-sdxl", SDXL_UNET_TARGETS, SDXL_ABSENT)],
)
def test_real_lora_unet_targets_exist(name, unet_targets, absent, tiny_pipeline):
    unet = tiny_pipeline(name).unet
    modules = dict(unet.named_modules())
    for path, kind in unet_targets.items():
        assert path in modules, f"{name}: UNet has no module {path!r} that real LoRA files target"
        assert isinstance(modules[path], kind), f"{name}: {path} is {type(modules[path]).__name__}, real files need {kind.__name__}"
    for path in absent:
        assert path not in modules, f"{name}: {path!r} exists but the real model has no such block"


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_real_lora_text_encoder_targets_exist(name, tiny_pipeline):
    pipe = tiny_pipeline(name)
    encoders = [(pipe.text_encoder, CLIP_L_TARGETS)]
    if name == "tiny-sdxl":
        encoders.append((pipe.text_encoder_2, OPEN_CLIP_G_TARGETS))
    for encoder, targets in encoders:
        for path in targets:
            module = _text_module(encoder, path)
            assert isinstance(module, LINEAR), f"{name}: {type(encoder).__name__}.{path} is {type(module).__name__}"


@pytest.mark.parametrize("name", presets.preset_names("unet"))
def test_block_structure_matches_the_real_model(name):
    config = presets.preset_configs(name)["unet"]
    assert config["layers_per_block"] == 2, "real SD1.5 and SDXL use 2 layers per block"
    if name == "tiny-sd15":
        assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
        assert config["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    else:
        assert config["down_block_types"] == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2
        assert config["up_block_types"] == ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]
        assert config["transformer_layers_per_block"] == [1, 2, 10], "SDXL's transformer depth per level"
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn"


@pytest.mark.parametrize("name", presets.preset_names("unet"))
def test_attention_slots_are_the_ones_block_weight_presets_name(name, tiny_pipeline):
    unet = tiny_pipeline(name).unet
    slots = {
        original_unet_key(module_name, unet.config)
        for module_name, _ in unet.named_modules()
        if re.fullmatch(r"(down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+", module_name)
    }
    assert slots == ATTENTION_SLOTS[name], f"{name}: attention slots {sorted(slots)}"


def test_text_encoders_have_distinct_widths():
    pipe = presets.build_pipeline("tiny-sdxl", dtype="fp32", device="cpu")
    # diffusers' single-file loader tells the two SDXL encoders apart by hidden width
    assert pipe.text_encoder.config.hidden_size != pipe.text_encoder_2.config.hidden_size


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid presets: tiny-sd15, tiny-sdxl"):
        presets.build_pipeline("tiny-sd2")


def test_preset_fingerprints_name_and_version():
    assert presets.PRESETS["tiny-sd15"].fingerprint == f"preset:tiny-sd15@{presets.PRESETS['tiny-sd15'].version}"


def test_tokenizer_pads_to_clip_context_length():
    tokenizer = presets.build_tokenizer()
    ids = tokenizer("the cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77, f"padded prompt has {len(ids)} tokens, expected CLIP's 77"
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids, "start and end tokens missing"


def test_preset_configs_are_copies():
    configs = presets.preset_configs("tiny-sdxl")
    configs["unet"]["block_out_channels"].append(1)
    assert presets.preset_configs("tiny-sdxl")["unet"]["block_out_channels"] == [8, 16, 32], "callers must not edit the preset"
