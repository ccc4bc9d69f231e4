"""tiny-sdxl-shapes: the built-in base that has learned something (bases.training), its demo LoRAs,
and the training script itself (a 2-step smoke run, so it cannot rot)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraloom import Runtime
from loraloom.bases import presets, training
from loraloom.bases.loading import identify_base

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def _redness(image) -> float:
    """Mean of red minus blue over the picture, in [-1, 1]: the grey background adds nothing."""
    rgb = np.asarray(image, dtype=np.float32) / 255
    return float((rgb[..., 0] - rgb[..., 2]).mean())


def _sample(pipe, prompt: str):
    gen = torch.Generator().manual_seed(42)
    return pipe(prompt, num_inference_steps=20, guidance_scale=5.0, height=64, width=64, generator=gen).images[0]


@pytest.fixture(scope="module")
def shapes():
    return presets.build_pipeline("tiny-sdxl-shapes", dtype="fp32", device="cpu")


def test_the_shipped_weights_load_offline_and_bit_identically(shapes):
    again = presets.build_pipeline("tiny-sdxl-shapes", dtype="fp32", device="cpu")
    seeded = presets.build_pipeline("tiny-sdxl", dtype="fp32", device="cpu")
    for component in presets.WEIGHT_COMPONENTS:
        mine, other = getattr(shapes, component).state_dict(), getattr(again, component).state_dict()
        assert mine.keys() == other.keys()
        assert all(torch.equal(mine[k], other[k]) for k in mine), f"{component} differs between two loads"
    unet = shapes.unet.state_dict()
    random_unet = seeded.unet.state_dict()
    assert not all(torch.equal(unet[k], random_unet[k]) for k in unet), "the UNet must be the trained one"


def test_the_fingerprint_follows_the_weights_file(tmp_path, monkeypatch):
    shipped = presets.get_preset("tiny-sdxl-shapes")
    first = identify_base("tiny-sdxl-shapes").fingerprint
    assert first.startswith("preset:tiny-sdxl-shapes@1+weights:sha256:")
    copy = tmp_path / shipped.weights
    shutil.copyfile(shipped.weights_path, copy)
    monkeypatch.setattr(presets, "WEIGHTS_DIR", tmp_path)
    assert identify_base("tiny-sdxl-shapes").fingerprint == first, "same bytes, same fingerprint"
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    copy.write_bytes(bytes(data))
    assert identify_base("tiny-sdxl-shapes").fingerprint != first
    assert identify_base("tiny-sdxl").fingerprint == "preset:tiny-sdxl@1", "the random presets are unchanged"


def test_a_missing_weights_file_is_a_clear_error(tmp_path, monkeypatch):
    from loraloom.bases.arch import BaseModelError

    monkeypatch.setattr(presets, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(BaseModelError, match="weights file .* is missing") as info:
        presets.build_pipeline("tiny-sdxl-shapes")
    assert info.value.fix


def test_the_prompt_picks_the_colour(shapes):
    # On the random tiny-sdxl both prompts give the same coloured noise (red minus blue measured: -0.0008).
    red, blue = _sample(shapes, "a red circle"), _sample(shapes, "a blue circle")
    assert _redness(red) - _redness(blue) > 0.1, (_redness(red), _redness(blue))


def _run_shapes_blend(tmp_path, name: str, **weights) -> Image.Image:
    rt = Runtime(lora_dirs=[], output_dir=tmp_path / name, demo_loras=True)
    overrides = {"4.weight": weights.get("red", 0.0), "4.text_encoder_weight": 0.0,
                 "4.weight_2": weights.get("stripes", 0.0), "6.filename_prefix": name}
    rt.run(WORKFLOWS / "api" / "shapes_blend_api.json", overrides=overrides)
    (png,) = (tmp_path / name).glob("*.png")
    return Image.open(png).convert("RGB")


def test_the_demo_loras_do_visibly_different_things(tmp_path):
    base = _run_shapes_blend(tmp_path, "base")
    red = _run_shapes_blend(tmp_path, "red", red=1.0)
    stripes = _run_shapes_blend(tmp_path, "stripes", stripes=1.0)
    # the prompt is "a blue circle": the colour LoRA turns it red, the texture LoRA keeps it blue
    assert _redness(red) - _redness(base) > 0.1, (_redness(base), _redness(red))
    assert abs(_redness(stripes) - _redness(base)) < abs(_redness(red) - _redness(base)) / 2

    def row_contrast(image) -> float:
        # stripes run across: the mean brightness of each row swings, a plain shape's does not
        rows = np.asarray(image, dtype=np.float32).mean(axis=(1, 2))
        return float(np.abs(np.diff(rows)).sum())

    assert row_contrast(stripes) > 1.5 * row_contrast(base), (row_contrast(base), row_contrast(stripes))


def test_training_runs_end_to_end(tmp_path):
    torch.set_num_threads(1)
    out = training.train_base(tmp_path / "base.safetensors", images=8, vae_steps=2, unet_steps=2, batch=2,
                              log_every=0)
    pipe = training.load_trained(out)
    lora = training.train_lora(pipe, "red", tmp_path / "demo-red.safetensors", images=8, steps=2, batch=2,
                               log_every=0)
    from loraloom.lora.readers import read_lora

    assert read_lora(lora).components["unet"], "the demo LoRA reads back with UNet modules"
