"""bases/arch.py: SD1.5 or SDXL from a live pipeline, a diffusers folder or config skeleton, or a
single-file checkpoint's key names; anything else is refused with what was found."""
import json
import shutil

import pytest

from loraloom.bases import arch, presets
from loraloom.bases.arch import BaseModelError


@pytest.mark.parametrize("name", presets.preset_names("unet"))
def test_arch_detection_everywhere(name, tiny_model_files):
    expected = presets.PRESETS[name].arch
    files = tiny_model_files(name)
    assert arch.detect_pipeline_arch(presets.build_pipeline(name, dtype="fp32", device="cpu")) == expected
    assert arch.detect_folder_arch(files["folder"]) == expected
    assert arch.detect_folder_arch(files["config"]) == expected
    assert arch.detect_file_arch(files["single_file"]) == expected


def test_unsupported_architectures_are_named():
    sd2_like = dict(presets.preset_configs("tiny-sd15")["unet"], use_linear_projection=True)
    with pytest.raises(ValueError, match="SD2 uses linear projection and is not supported"):
        arch.arch_from_unet_config(sd2_like, "here")
    inpainting = dict(presets.preset_configs("tiny-sd15")["unet"], in_channels=9)
    with pytest.raises(ValueError, match="in_channels 9"):
        arch.arch_from_unet_config(inpainting, "here")
    refiner_keys = ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.positional_embedding"]
    with pytest.raises(ValueError, match="SDXL refiner"):
        arch.detect_checkpoint_arch(refiner_keys, "refiner.safetensors")


def test_pipeline_class_must_agree_with_its_unet(tiny_model_files, tmp_path):
    folder = shutil.copytree(tiny_model_files("tiny-sd15")["config"], tmp_path / "lying")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not match its sd15 UNet; expected 'StableDiffusionPipeline'"):
        arch.detect_folder_arch(folder)


def test_checkpoint_keys_decide_the_arch():
    unet_key = arch.UNET_PREFIX + "input_blocks.0.0.weight"
    assert arch.detect_checkpoint_arch([unet_key, arch.SD15_TEXT_KEY], "a") == "sd15"
    assert arch.detect_checkpoint_arch([unet_key, arch.SD15_TEXT_KEY, arch.SDXL_TEXT_KEY], "b") == "sdxl"


@pytest.mark.parametrize("text_key, says", [
    ("cond_stage_model.model.positional_embedding", "found SD2 (OpenCLIP text encoder"),
    ("something.else", "found no known text encoder keys"),
])
def test_other_checkpoints_say_what_was_found(text_key, says):
    keys = [arch.UNET_PREFIX + "out.2.weight", text_key]
    with pytest.raises(BaseModelError) as info:
        arch.detect_checkpoint_arch(keys, "x.safetensors")
    text = str(info.value)
    assert text.startswith("x.safetensors: " + says), text
    assert arch.SD15_TEXT_KEY in text and arch.SDXL_TEXT_KEY in text, "names the keys it looked for"


def test_a_pipeline_without_a_unet_is_refused(tiny_sd15):
    with pytest.raises(BaseModelError, match="pipeline AutoencoderKL has no UNet or transformer; supported: StableDiffusionPipeline"):
        arch.detect_pipeline_arch(tiny_sd15.vae)


def test_file_missing_or_not_safetensors(tmp_path):
    with pytest.raises(BaseModelError, match="gone.safetensors: cannot read .*No such file"):
        arch.detect_file_arch(tmp_path / "gone.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"<html>not a model</html>")
    with pytest.raises(BaseModelError, match="bad.safetensors: despite its .safetensors name, this is an HTML"):
        arch.detect_file_arch(bad)


def test_folder_with_broken_json_names_the_file(tmp_path):
    (tmp_path / "model_index.json").write_text("{broken")
    with pytest.raises(BaseModelError, match="model_index.json: invalid JSON"):
        arch.detect_folder_arch(tmp_path)
