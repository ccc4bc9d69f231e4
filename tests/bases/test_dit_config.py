"""The transformer config of a Flux / SD3.5 single file, derived from its header (bases/dit_config.py):
equal to the published diffusers configs for real-size headers (built on the meta device, renamed to
the original layout by bases/dit_file), bare or under ComfyUI's prefix with other parts beside it;
equal to our tiny presets' configs for the files SaveCheckpoint writes, where shapes tell; refused
with the key or value where they do not."""
import json

import pytest
import torch

from loraloom.bases import dit_config, dit_file, presets
from loraloom.bases.arch import UNET_PREFIX, BaseModelError
from loraloom.bases.checks import weights_header

# The transformer/config.json files of the published models (Hugging Face: black-forest-labs/FLUX.1-dev
# and FLUX.1-schnell, stabilityai/stable-diffusion-3.5-large and -medium), as diffusers reads them.
FLUX_DEV = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True,
            "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
            "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}
FLUX_SCHNELL = {**FLUX_DEV, "guidance_embeds": False}
SD35_LARGE = {"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 2432,
              "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38,
              "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
              "qk_norm": "rms_norm", "sample_size": 128}
SD35_MEDIUM = {**SD35_LARGE, "caption_projection_dim": 1536, "num_attention_heads": 24, "num_layers": 24,
               "pos_embed_max_size": 384, "dual_attention_layers": list(range(13))}
PUBLISHED = {"flux-dev": ("flux", FLUX_DEV), "flux-schnell": ("flux", FLUX_SCHNELL),
             "sd3.5-large": ("sd3", SD35_LARGE), "sd3.5-medium": ("sd3", SD35_MEDIUM)}


def _meta_model(config: dict):
    """The transformer this config describes, on the meta device (no memory)."""
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, config["_class_name"]).from_config(config)


def _model_config(model) -> dict:
    return json.loads(json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")}))


def _original_shapes(model, arch: str) -> dict[str, tuple]:
    """The key names and shapes of this model's single file (bases.dit_file's renaming)."""
    return {k: tuple(t.shape) for k, t in dit_file.to_original(model.state_dict(), arch).items()}


@pytest.fixture(scope="module")
def real_headers():
    """name -> (arch, the published model on meta, its single file's shapes)."""
    out = {}
    for name, (arch, config) in PUBLISHED.items():
        model = _meta_model(config)
        out[name] = (arch, model, _original_shapes(model, arch))
    return out


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_configs_derived_from_real_size_headers_equal_the_published_ones(name, real_headers):
    arch, published, shapes = real_headers[name]
    derived = _meta_model(dit_config.transformer_config(shapes, arch, f"real-size {name} header"))
    want, got = _model_config(published), _model_config(derived)
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if got.get(k) != want.get(k)}
    assert {k: tuple(t.shape) for k, t in derived.state_dict().items()} == \
        {k: tuple(t.shape) for k, t in published.state_dict().items()}, name


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium"])
def test_comfyui_prefix_and_an_all_in_one_files_other_parts_give_the_same_config(name, real_headers):
    arch, _, shapes = real_headers[name]
    bare = dit_config.transformer_config(shapes, arch, name)
    all_in_one = {UNET_PREFIX + k: v for k, v in shapes.items()}
    all_in_one.update({"first_stage_model.decoder.conv_in.weight": (512, 16, 3, 3),
                       "text_encoders.t5xxl.transformer.shared.weight": (32128, 4096)})
    assert dit_config.transformer_config(all_in_one, arch, name) == bare


@pytest.mark.parametrize("name", presets.preset_names("transformer"))
def test_tiny_presets_single_files_give_their_configs(name, tiny_model_files, monkeypatch):
    arch = name.removeprefix("tiny-")
    header = weights_header(tiny_model_files(name)["single_file"])
    shapes = {k: info.shape for k, info in header.tensors.items()}
    preset = json.loads(presets.build_pipeline(name, dtype="fp32", device="cpu").transformer.to_json_string())
    if arch == "flux":
        # heads of 16: Flux's rope axes are known for heads of 128 only, so refused, naming the value
        with pytest.raises(BaseModelError) as info:
            dit_config.transformer_config(shapes, arch, name)
        assert info.value.kind == "config_underivable" and info.value.value == 16, info.value.render()
        monkeypatch.setattr(dit_config, "FLUX_ROPE_AXES", {16: preset["axes_dims_rope"]})
    else:
        monkeypatch.setattr(dit_config, "SD3_SAMPLE_SIZE", preset["sample_size"])
    # with the values no shape tells set to the preset's, everything else comes from the shapes
    got = _model_config(_meta_model(dit_config.transformer_config(shapes, arch, name)))
    want = _model_config(_meta_model(preset))
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if got.get(k) != want.get(k)}


def test_a_missing_key_is_named(real_headers):
    _, _, shapes = real_headers["flux-dev"]
    shapes = {k: v for k, v in shapes.items() if not k.startswith("txt_in.")}
    with pytest.raises(BaseModelError) as info:
        dit_config.transformer_config(shapes, "flux", "cut.safetensors")
    err = info.value
    assert err.kind == "config_underivable" and err.key == "txt_in.weight" and str(err.file) == "cut.safetensors", \
        err.render()


def test_flux_fill_is_refused_by_its_input_channels(real_headers):
    _, _, shapes = real_headers["flux-dev"]
    fill = {**shapes, "img_in.weight": (3072, 384)}
    with pytest.raises(BaseModelError) as info:
        dit_config.transformer_config(fill, "flux", "flux1-fill-dev.safetensors")
    assert info.value.kind == "unsupported_arch" and info.value.value == 384, info.value.render()


def test_sd3_without_qk_norm_takes_heads_of_64(real_headers):
    _, _, shapes = real_headers["sd3.5-large"]
    plain = {k: v for k, v in shapes.items() if ".ln_q." not in k and ".ln_k." not in k}
    config = dit_config.transformer_config(plain, "sd3", "sd3-medium.safetensors")
    assert (config["qk_norm"], config["attention_head_dim"], config["num_attention_heads"]) == (None, 64, 38), config


# google/t5-v1_1-xxl's config.json: the text_encoder_2 of FLUX.1-dev / schnell, text_encoder_3 of SD3.5
T5_XXL = {"d_ff": 10240, "d_kv": 64, "d_model": 4096, "num_heads": 64, "num_layers": 24, "num_decoder_layers": 24,
          "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6,
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
          "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def _meta_t5(config: dict):
    import transformers

    with torch.device("meta"):
        return transformers.T5EncoderModel(transformers.T5Config(**{k: v for k, v in config.items()
                                                                      if k not in ("architectures", "model_type")}))


def _t5_config(model) -> dict:
    kept = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in (
        "transformers_version", "dtype", "torch_dtype", "architectures", "output_hidden_states", "return_dict",
        "output_attentions")}
    return json.loads(json.dumps(kept))


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer."])
def test_t5_config_from_a_real_size_header_equals_the_published_one(prefix):
    published = _meta_t5(T5_XXL)
    shapes = {prefix + k: tuple(t.shape) for k, t in published.state_dict().items()}
    if prefix:  # an all-in-one file: the transformer and the VAE beside the encoder
        shapes.update({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (7296, 2432),
                       "first_stage_model.decoder.conv_in.weight": (512, 16, 3, 3)})
    derived = _meta_t5(dit_config.t5_config(shapes, "t5xxl_fp16.safetensors"))
    want, got = _t5_config(published), _t5_config(derived)
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if got.get(k) != want.get(k)}


@pytest.mark.parametrize("name", presets.preset_names("transformer"))
def test_t5_config_of_the_tiny_presets_encoder(name):
    pipe = presets.build_pipeline(name, dtype="fp32", device="cpu")
    t5 = pipe.text_encoder_2 if name == "tiny-flux" else pipe.text_encoder_3
    shapes = {k: tuple(v.shape) for k, v in t5.state_dict().items()}
    got = _t5_config(_meta_t5(dit_config.t5_config(shapes, name)))
    assert got == _t5_config(t5), {k: (got.get(k), v) for k, v in _t5_config(t5).items() if got.get(k) != v}


def test_a_t5_file_without_the_gated_feed_forward_is_refused():
    shapes = {k: tuple(t.shape) for k, t in _meta_t5({**T5_XXL, "feed_forward_proj": "relu"}).state_dict().items()}
    with pytest.raises(BaseModelError) as info:
        dit_config.t5_config(shapes, "t5-v1_0.safetensors")
    assert info.value.kind == "config_underivable" and "gated" in info.value.message, info.value.render()


# The HF text-encoder configs of CLIP-L (openai/clip-vit-large-patch14, SD3.5's with its 768 projection)
# and OpenCLIP bigG (SD3.5's text_encoder_2), as ComfyUI's clip_l / clip_g files hold them.
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
          "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
CLIP_G = {**CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
          "num_hidden_layers": 32, "hidden_act": "gelu", "projection_dim": 1280}


def _meta_clip(config: dict, projection: bool):
    import transformers

    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    with torch.device("meta"):
        return cls(transformers.CLIPTextConfig(**{k: v for k, v in config.items()
                                                 if k not in ("architectures", "model_type")}))


def _clip_file_shapes(model) -> dict[str, tuple]:
    """Key -> shape as a CLIP text encoder's file holds it: under "text_model." (transformers 5's
    CLIPTextModel state dict leaves that level out; its loader maps the files' names)."""
    return {k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k: tuple(t.shape)
            for k, t in model.state_dict().items()}


@pytest.mark.parametrize("which,published,projection,prefix", [
    ("clip_l", CLIP_L, False, ""),  # Flux's clip_l.safetensors
    ("clip_l", CLIP_L, True, "text_encoders.clip_l.transformer."),  # SD3.5 all-in-one
    ("clip_g", CLIP_G, True, ""),
    ("clip_g", CLIP_G, True, "text_encoders.clip_g.transformer."),
])
def test_clip_configs_from_real_size_headers_equal_the_published_ones(which, published, projection, prefix):
    model = _meta_clip(published, projection)
    shapes = {prefix + k: v for k, v in _clip_file_shapes(model).items()}
    if prefix:  # the other encoder of an all-in-one file must not be read instead
        other = "clip_g" if which == "clip_l" else "clip_l"
        shapes[f"text_encoders.{other}.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 4)
    config = dit_config.clip_config(shapes, which, "clip.safetensors")
    assert config["architectures"] == [type(model).__name__], config
    got, want = _t5_config(_meta_clip(config, projection)), _t5_config(model)
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if got.get(k) != want.get(k)}


@pytest.mark.parametrize("name,component,which", [("tiny-flux", "text_encoder", "clip_l"),
                                                  ("tiny-sd3", "text_encoder", "clip_l"),
                                                  ("tiny-sd3", "text_encoder_2", "clip_g")])
def test_the_tiny_presets_clip_encoders_are_refused_naming_their_width(name, component, which):
    # heads of 64 are what no shape tells; the presets' encoders (32 and 48 wide) are not of that
    # family, so a file of one alone has no derivable config (our own files carry their configs)
    encoder = getattr(presets.build_pipeline(name, dtype="fp32", device="cpu"), component)
    with pytest.raises(BaseModelError) as info:
        dit_config.clip_config(_clip_file_shapes(encoder), which, name)
    err = info.value
    assert err.kind == "config_underivable" and err.value == encoder.config.hidden_size, err.render()


# vae/config.json of FLUX.1-dev and of SD3.5 Large (Medium's is the same)
_DIT_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "out_channels": 3,
            "latent_channels": 16, "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32,
            "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False}
PUBLISHED_VAES = {"flux": {**_DIT_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
                  "sd3": {**_DIT_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}}


@pytest.mark.parametrize("arch", sorted(PUBLISHED_VAES))
@pytest.mark.parametrize("all_in_one", [False, True])
def test_vae_configs_from_real_size_headers_equal_the_published_ones(arch, all_in_one):
    import diffusers

    from loraloom.bases import ldm_keys

    with torch.device("meta"):
        published = diffusers.AutoencoderKL.from_config(PUBLISHED_VAES[arch])
    original = ldm_keys.vae_to_original(published.state_dict(), published.config)  # "first_stage_model.*"
    shapes = {k if all_in_one else k.removeprefix("first_stage_model."): tuple(t.shape) for k, t in original.items()}
    config = dit_config.dit_vae_config(shapes, arch, "ae.safetensors")
    with torch.device("meta"):
        derived = diffusers.AutoencoderKL.from_config(config)
    want, got = _model_config(published), _model_config(derived)
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if got.get(k) != want.get(k)}


@pytest.mark.parametrize("name", presets.preset_names("transformer"))
def test_the_tiny_presets_vae_is_refused_naming_its_channels(name):
    from loraloom.bases import ldm_keys

    # 32 GroupNorm groups is what no shape tells; the presets' VAE starts at 8 channels
    vae = presets.build_pipeline(name, dtype="fp32", device="cpu").vae
    shapes = {k: tuple(t.shape) for k, t in ldm_keys.vae_to_original(vae.state_dict(), vae.config).items()}
    with pytest.raises(BaseModelError) as info:
        dit_config.dit_vae_config(shapes, name.removeprefix("tiny-"), name)
    err = info.value
    assert err.kind == "config_underivable" and err.value == vae.config.block_out_channels[0] == 8, err.render()
