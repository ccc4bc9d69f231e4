"""bases/export.py: a pipeline written as a diffusers folder, a config skeleton and an original-layout
single file (what load_base reads back; the round trips are tested in test_loading.py)."""
import json

import pytest
from safetensors import safe_open

from loraloom.bases import auto_config, export, presets


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_config_skeleton_has_no_weights(name, tiny_model_files):
    config = tiny_model_files(name)["config"]
    names = {p.name for p in config.rglob("*") if p.is_file()}
    assert "model_index.json" in names and "config.json" in names and "tokenizer.json" in names, sorted(names)
    weights = [p for p in config.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert not weights, f"skeleton holds weights: {weights}"


def test_writers_refuse_to_overwrite(tiny_model_files, tiny_sd15):
    with pytest.raises(FileExistsError, match="already exists and is not an empty folder.*Fix:"):
        export.save_diffusers_folder(tiny_sd15, tiny_model_files("tiny-sd15")["folder"])
    with pytest.raises(FileExistsError, match="already exists.*Fix:"):
        export.save_single_file(tiny_sd15, tiny_model_files("tiny-sd15")["single_file"])


def test_single_file_needs_a_safetensors_name(tiny_sd15, tmp_path):
    with pytest.raises(ValueError, match="model.ckpt: single-file checkpoints are written as .safetensors. Fix:"):
        export.save_single_file(tiny_sd15, tmp_path / "model.ckpt")
    assert not list(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("name", presets.preset_names("unet"))
def test_single_file_says_who_wrote_it_and_for_which_arch(name, tiny_model_files):
    with safe_open(str(tiny_model_files(name)["single_file"]), framework="pt") as handle:
        metadata = handle.metadata()
    configs = json.loads(metadata.pop(auto_config.CONFIGS_KEY))
    pads = json.loads(metadata.pop(auto_config.TOKENIZERS_KEY))
    assert metadata == {"format": "pt", "writer": export.SINGLE_FILE_FORMAT, "arch": presets.PRESETS[name].arch}
    assert configs["unet/config.json"]["block_out_channels"] == presets.PRESETS[name].configs["unet"]["block_out_channels"]
    assert pads["tokenizer"] == "<|endoftext|>" and pads.get("tokenizer_2", "!") == "!", pads


def test_config_skeleton_names_the_pipeline_class(tiny_model_files):
    index = json.loads((tiny_model_files("tiny-sdxl")["config"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
