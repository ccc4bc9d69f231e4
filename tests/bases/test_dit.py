"""Flux and SD3.5 bases: the tiny presets keep the real layouts, detection tells them apart offline,
and a diffusers folder of either loads back bit-exact through the checked path."""
import json
import shutil

import pytest
import torch

from loraloom.bases import arch, export, load_base, presets
from loraloom.bases.arch import BaseModelError
from loraloom.lora.arches import ARCHES

DIT_PRESETS = presets.preset_names("transformer")


def test_the_dit_presets_are_the_two_new_architectures():
    assert {presets.PRESETS[name].arch for name in DIT_PRESETS} == {"flux", "sd3"}


@pytest.mark.parametrize("name", DIT_PRESETS)
def test_presets_are_built_from_the_description(name, tiny_pipeline):
    pipe = tiny_pipeline(name)
    description = ARCHES[presets.PRESETS[name].arch]
    assert type(pipe).__name__ == description.pipeline_class
    transformer = getattr(pipe, description.denoiser)
    assert type(transformer).__name__ == description.denoiser_class
    for family in description.blocks:
        assert len(transformer.get_submodule(family.path)) == family.count, f"{name}: {family.name} blocks"
    assert all(getattr(pipe, te, None) is not None for te in description.text_encoders)
    assert getattr(pipe, "unet", None) is None


def test_flux_has_dev_layout_and_the_real_latent_space(tiny_pipeline):
    pipe = tiny_pipeline("tiny-flux")
    t = pipe.transformer
    assert (len(t.transformer_blocks), len(t.single_transformer_blocks)) == (19, 38)
    assert hasattr(t.time_text_embed, "guidance_embedder"), "dev's distilled guidance embedding"
    # every module path a diffusers Flux LoRA names
    for path in ("transformer_blocks.18.attn.to_q", "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_add_out",
                 "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2", "transformer_blocks.0.norm1.linear",
                 "single_transformer_blocks.37.proj_mlp", "single_transformer_blocks.37.proj_out",
                 "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.norm.linear"):
        assert isinstance(t.get_submodule(path), torch.nn.Linear), path
    assert (pipe.vae.config.latent_channels, pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (16, 0.3611, 0.1159)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.use_dynamic_shifting
    assert (pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_layers) == (12, 24)


def test_sd3_has_the_35_large_layout(tiny_pipeline):
    pipe = tiny_pipeline("tiny-sd3")
    t = pipe.transformer
    assert len(t.transformer_blocks) == 38
    block = t.transformer_blocks[0]
    assert type(block.attn.norm_q).__name__ == "RMSNorm", "SD3.5 Large normalises q and k"
    assert t.transformer_blocks[-1].context_pre_only, "the last joint block drops the text stream, as in SD3"
    assert (pipe.vae.config.latent_channels, pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (16, 1.5305, 0.0609)
    widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    assert widths[0] != widths[1] and pipe.text_encoder_3.config.d_model >= sum(widths), \
        "SD3 pads the two CLIP states to T5's width"
    assert [type(e).__name__ for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)] == \
        ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]


def test_t5_tokenizer_is_built_offline_and_segments_words():
    tokenizer = presets.build_t5_tokenizer(512)
    ids = tokenizer("a photo of a Cat").input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:4] == ["\u2581a", "\u2581photo", "\u2581of", "\u2581a"] and pieces[-1] == "</s>", pieces
    assert ids == presets.build_t5_tokenizer(512)("a photo of a Cat").input_ids


@pytest.mark.parametrize("name", DIT_PRESETS)
def test_detection_from_pipeline_folder_and_skeleton(name, tiny_pipeline, tiny_model_files):
    expected = presets.PRESETS[name].arch
    files = tiny_model_files(name)
    assert arch.detect_pipeline_arch(tiny_pipeline(name)) == expected
    assert arch.detect_folder_arch(files["folder"]) == expected
    assert arch.detect_folder_arch(files["config"]) == expected


def _edited_copy(folder, tmp_path, file, **changes):
    copy = shutil.copytree(folder, tmp_path / "edited")
    path = copy / file
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("file, changes, says", [
    ("transformer/config.json", {"in_channels": 384}, "FluxTransformer2DModel has in_channels 384 .*Fill"),
    ("transformer/config.json", {"_class_name": "HunyuanVideoTransformer3DModel"},
     "transformer class 'HunyuanVideoTransformer3DModel' is not supported; supported: FluxTransformer2DModel \\(Flux\\)"),
    ("model_index.json", {"_class_name": "FluxKontextPipeline"},
     "pipeline class 'FluxKontextPipeline' does not match its flux FluxTransformer2DModel; expected 'FluxPipeline'"),
])
def test_unsupported_flux_variants_are_named(tiny_model_files, tmp_path, file, changes, says):
    folder = _edited_copy(tiny_model_files("tiny-flux")["config"], tmp_path, file, **changes)
    with pytest.raises(BaseModelError, match=says):
        arch.detect_folder_arch(folder)


@pytest.mark.parametrize("key, expected", [
    ("double_blocks.0.img_attn.qkv.weight", "flux"),
    ("model.diffusion_model.single_blocks.3.linear1.weight", "flux"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "sd3"),
])
def test_single_file_dit_checkpoints_say_what_they_are(key, expected):
    assert arch.detect_checkpoint_arch([key, "final_layer.linear.weight"], "x.safetensors") == expected


@pytest.mark.parametrize("name", DIT_PRESETS)
def test_diffusers_folder_loads_back_bit_exact(name, tiny_model_files):
    original = load_base(name, dtype="fp32", device="cpu").pipeline
    loaded = load_base(tiny_model_files(name)["folder"], dtype="fp32", device="cpu")
    assert loaded.arch == presets.PRESETS[name].arch and loaded.fingerprint.startswith("folder:sha256:")
    assert type(loaded.pipeline) is type(original)
    modules = [c for c, m in original.components.items() if isinstance(m, torch.nn.Module)]
    assert len(modules) == 2 + len(ARCHES[loaded.arch].text_encoders), modules
    for component in modules:
        want, got = getattr(original, component).state_dict(), getattr(loaded.pipeline, component).state_dict()
        assert want.keys() == got.keys(), f"{name} {component}: {sorted(set(want) ^ set(got))[:5]}"
        differ = [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])]
        assert not differ, f"{name} {component}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    for tokenizer in ("tokenizer_2", "tokenizer_3"):
        if getattr(original, tokenizer, None) is not None:
            assert getattr(loaded.pipeline, tokenizer)("a red circle").input_ids == \
                getattr(original, tokenizer)("a red circle").input_ids


def test_a_folder_naming_a_foreign_text_encoder_class_is_refused(tiny_model_files, tmp_path):
    folder = _edited_copy(tiny_model_files("tiny-sd3")["folder"], tmp_path, "model_index.json",
                          text_encoder_3=["transformers", "UMT5EncoderModel"])
    with pytest.raises(BaseModelError, match="component 'text_encoder_3' names class \\['transformers', 'UMT5EncoderModel'\\]"):
        load_base(folder, dtype="fp32", device="cpu")
