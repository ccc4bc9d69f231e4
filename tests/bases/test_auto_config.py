"""bases/auto_config.py: config="auto" for single files. Our own files load back bit-exactly from the
configs they record; other files get configs derived from their shapes, which equal diffusers' /
transformers' published configs at the real SD1.5 and SDXL sizes; tokenizers are searched offline in
a fixed order; what cannot work is refused with what is missing and the Fix."""
import json

import pytest
import torch

from loraloom.bases import auto_config, export, ldm_keys, presets
from loraloom.bases.arch import BaseModelError, OPEN_CLIP_PREFIX, TEXT_PREFIXES
from loraloom.bases.loading import load_base

# diffusers' and transformers' published configs (stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0,
# as on the hub), written down here: the model-defining values, bookkeeping keys left out.
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "norm_num_groups": 32, "out_channels": 3, "up_block_types": ["UpDecoderBlock2D"] * 4}
SD15_VAE = {**_VAE, "sample_size": 512}
SDXL_VAE = {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
          "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-05}
OPEN_CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                  "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 1280,
                  "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-05}
PUBLISHED = {"sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": CLIP_L},
             "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": CLIP_L, "text_encoder_2": OPEN_CLIP_BIGG}}
TEXT_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


def _meta_models(configs: dict) -> dict:
    """The models these configs describe, on the meta device (no memory)."""
    import diffusers
    import transformers

    models = {}
    with torch.device("meta"):
        for name, config in configs.items():
            if name in TEXT_CLASSES:
                cls = getattr(transformers, TEXT_CLASSES[name])
                models[name] = cls(transformers.CLIPTextConfig(**config))
            else:
                models[name] = (diffusers.UNet2DConditionModel if name == "unet" else diffusers.AutoencoderKL
                                ).from_config(config)
    return models


def _original_shapes(models: dict, arch: str) -> dict[str, tuple]:
    """The original single-file key names and shapes of these models (bases.ldm_keys' renaming)."""
    out = ldm_keys.unet_to_original(models["unet"].state_dict(), models["unet"].config)
    out.update(ldm_keys.vae_to_original(models["vae"].state_dict(), models["vae"].config))
    out.update(ldm_keys.clip_to_original(models["text_encoder"].state_dict(), TEXT_PREFIXES[(arch, "text_encoder")]))
    if "text_encoder_2" in models:
        out.update(ldm_keys.open_clip_to_original(models["text_encoder_2"].state_dict()))
    return {key: tuple(t.shape) for key, t in out.items()}


def _model_config(model) -> dict:
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in (
        "transformers_version", "dtype", "torch_dtype", "architectures", "output_hidden_states", "return_dict",
        "output_attentions")}
    return json.loads(json.dumps(kept))  # tuples and lists alike


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_configs_derived_from_real_size_shapes_equal_the_published_ones(arch):
    published = _meta_models(PUBLISHED[arch])
    files = auto_config.derive_configs(_original_shapes(published, arch), arch, f"real-size {arch} header")
    derived = _meta_models({name: files[f"{name}/config.json"] for name in PUBLISHED[arch]})
    for name in PUBLISHED[arch]:
        want, got = _model_config(published[name]), _model_config(derived[name])
        assert got == want, f"{arch} {name}: " + str({k: (got.get(k), want.get(k)) for k in set(want) | set(got)
                                                      if got.get(k) != want.get(k)})
        shapes = {k: tuple(t.shape) for k, t in derived[name].state_dict().items()}
        assert shapes == {k: tuple(t.shape) for k, t in published[name].state_dict().items()}, name
    assert files["model_index.json"]["_class_name"] == auto_config.FAMILY[arch]["pipeline"]


def _sample(pipe, steps: int = 2):
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat", num_inference_steps=steps, height=64, width=64, generator=generator, output_type="pt").images


def _same_weights(a, b, components) -> None:
    for name in components:
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        assert all(torch.equal(left[k], right[k]) for k in left), f"{name}: weights differ"


@pytest.mark.parametrize("name", presets.preset_names("unet"))
def test_our_single_file_loads_with_auto_as_with_its_config_folder(name, tiny_model_files):
    files = tiny_model_files(name)
    auto = load_base(files["single_file"], dtype="fp32", device="cpu")  # before: "needs a config folder"
    given = load_base(files["single_file"], config=files["config"], dtype="fp32", device="cpu")
    original = presets.build_pipeline(name, dtype="fp32", device="cpu")
    components = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if hasattr(original, c)]
    _same_weights(auto.pipeline, original, components)
    for c in components:
        assert _model_config(getattr(auto.pipeline, c)) == _model_config(getattr(original, c)), c
    assert torch.equal(_sample(auto.pipeline), _sample(given.pipeline)), "auto samples as the config folder does"
    assert "+tokenizers:" in auto.fingerprint and auto.fingerprint != given.fingerprint


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A folder with CLIP tokenizer files (the tiny vocabulary, as tokenizer.json) whose config says
    model_max_length 8192, as ComfyUI's sd1_tokenizer does."""
    folder = tmp_path_factory.mktemp("tokenizer")
    presets.build_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 8192}))
    return folder


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_a_foreign_file_of_the_standard_family_loads_with_configs_from_its_shapes(arch, tmp_path, tokenizer_folder,
                                                                                  standard_checkpoint):
    pipe, path = standard_checkpoint(arch, tmp_path / "foreign.safetensors")
    loaded = load_base(path, dtype="fp32", device="cpu", tokenizer_dirs=[tmp_path / "empty", tokenizer_folder])
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    _same_weights(loaded.pipeline, pipe, components)
    for c in components:
        assert _model_config(getattr(loaded.pipeline, c)) == _model_config(getattr(pipe, c)), c
    assert loaded.pipeline.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert loaded.pipeline.tokenizer.model_max_length == 77, "the text encoder's context, whatever the files say"
    if arch == "sdxl":
        assert loaded.pipeline.tokenizer_2.pad_token == "!", "OpenCLIP bigG pads with '!'"
    assert torch.equal(_sample(loaded.pipeline), _sample(pipe)), "the derived pipeline samples as the original"


def test_tokenizers_are_searched_in_order_then_the_hugging_face_cache(tmp_path, tokenizer_folder, monkeypatch):
    import huggingface_hub.constants

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert auto_config.find_clip_tokenizer([empty, tokenizer_folder], "x") == tokenizer_folder
    with pytest.raises(BaseModelError) as info:
        auto_config.find_clip_tokenizer([empty, tmp_path / "missing"], "model.safetensors")
    err = info.value
    assert err.kind == "tokenizer_missing" and str(empty) in err.message and str(tmp_path / "missing") in err.message
    assert "Hugging Face cache" in err.message and "tokenizers/clip" in err.fix, err.render()
    # a snapshot in the Hugging Face cache's own layout is found offline
    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "vocab.json").write_text(json.dumps(presets._VOCAB))
    (snapshot / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in presets._MERGES))
    (tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "refs").mkdir()
    (tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "refs" / "main").write_text("abc")
    assert auto_config.find_clip_tokenizer([empty], "x") == snapshot
    assert auto_config.find_clip_tokenizer([tokenizer_folder, empty], "x") == tokenizer_folder, "folders come first"


def test_a_foreign_file_without_a_tokenizer_says_where_it_looked(tmp_path, monkeypatch, standard_checkpoint):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _, path = standard_checkpoint("sd15", tmp_path / "foreign.safetensors")
    with pytest.raises(BaseModelError, match=r"needs the CLIP tokenizer .* looked in .*nowhere-1.*Fix: put the files"):
        load_base(path, dtype="fp32", device="cpu", tokenizer_dirs=[tmp_path / "nowhere-1"])


@pytest.mark.parametrize("name, parts", [("tiny-flux", ["clip_l", "t5xxl", "vae"]),
                                         ("tiny-sd3", ["clip_l", "clip_g", "t5xxl", "vae"])])
def test_a_transformer_file_with_auto_names_every_missing_part(name, parts, tiny_model_files, tmp_path):
    # its transformer config is the one it recorded (the tiny presets' heads of 16 derive from no shape)
    path = tiny_model_files(name)["single_file"]
    with pytest.raises(BaseModelError) as info:
        load_base(path, dtype="fp32", device="cpu", part_dirs={"text_encoders": [tmp_path], "vae": [tmp_path]})
    err = info.value
    assert err.kind == "parts_missing" and err.value == parts, err.render()
    assert str(tmp_path) in err.message and "t5xxl_fp16.safetensors" in err.message, err.message
    assert "models/text_encoders" in err.fix, err.fix


def test_a_file_missing_a_key_or_of_another_family_is_refused_with_the_key(tmp_path):
    shapes = _original_shapes(_meta_models(PUBLISHED["sd15"]), "sd15")
    gone = "first_stage_model.decoder.conv_in.weight"
    with pytest.raises(BaseModelError) as info:
        auto_config.derive_configs({k: v for k, v in shapes.items() if k != gone}, "sd15", "x.safetensors")
    assert info.value.key == gone and info.value.kind == "config_underivable", info.value.render()
    # a UNet whose width no family value divides: its heads cannot be told, so nothing is guessed
    odd = {k: tuple(100 if d == 320 else d for d in v) for k, v in shapes.items()}
    with pytest.raises(BaseModelError, match="is 100, not a multiple of 32"):
        auto_config.derive_configs(odd, "sd15", "x.safetensors")


def test_recorded_configs_must_be_of_the_files_architecture(tiny_model_files):
    header_metadata = {"writer": auto_config.WRITER,
                       auto_config.CONFIGS_KEY: json.dumps({"model_index.json": {"_class_name": "StableDiffusionXLPipeline"}})}
    with pytest.raises(BaseModelError, match="describes a 'StableDiffusionXLPipeline' pipeline, but the weights are sd15"):
        auto_config.auto_config({}, header_metadata, "sd15", "x.safetensors")
    bad = {"writer": auto_config.WRITER, auto_config.CONFIGS_KEY: json.dumps({"../../etc/x.json": {}})}
    with pytest.raises(BaseModelError, match="not a map of config files"):
        auto_config.auto_config({}, bad, "sd15", "x.safetensors")


def test_the_t5_tokenizer_is_searched_in_order_then_the_hugging_face_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    clip_only, t5 = tmp_path / "clip", tmp_path / "t5"
    presets.build_tokenizer().save_pretrained(clip_only)  # a CLIP folder (vocab.json + merges.txt) is not T5's
    (clip_only / "tokenizer.json").unlink(missing_ok=True)
    t5.mkdir()
    (t5 / "spiece.model").write_bytes(b"sentencepiece")
    assert auto_config.find_tokenizer("t5", [clip_only, t5], "x") == t5
    with pytest.raises(BaseModelError) as info:
        auto_config.find_tokenizer("t5", [clip_only], "flux1-dev.safetensors")
    err = info.value
    assert err.kind == "tokenizer_missing" and "T5 tokenizer" in err.message and str(clip_only) in err.message, \
        err.render()
    assert "google/t5-v1_1-xxl" in err.message and "tokenizers/t5" in err.fix, err.render()
    # FLUX.1-dev's tokenizer_2 in the Hugging Face cache's own layout is found offline
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev"
    (repo / "snapshots" / "abc" / "tokenizer_2").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "tokenizer_2" / "tokenizer.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert auto_config.find_tokenizer("t5", [clip_only], "x") == repo / "snapshots" / "abc" / "tokenizer_2"
