"""SaveCheckpoint: the fused model as one original-layout .safetensors file that diffusers'
from_single_file loads back, offline, bit for bit."""

import pytest
import torch
from safetensors import safe_open

from loraloom.bases import export, presets
from loraloom.bases.pool import pool_from

PIPELINES = {"tiny-sd15": "StableDiffusionPipeline", "tiny-sdxl": "StableDiffusionXLPipeline"}


def checkpoint_workflow(preset, lora_name, prefix="checkpoints/fused"):
    return {
        "1": {"class_type": "LoadBase", "inputs": {"source": preset, "dtype": "fp32", "device": "cpu"}},
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora_name}},
        "3": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": 0.8}},
        "4": {"class_type": "Fuse", "inputs": {"model": ["3", 0]}},
        "5": {"class_type": "SaveCheckpoint", "inputs": {"model": ["4", 0], "filename_prefix": prefix}},
    }


@pytest.mark.parametrize("preset", list(PIPELINES))
def test_checkpoint_loads_back_with_from_single_file_bit_exactly(runtime, tmp_path, preset):
    import diffusers

    result = runtime.run(checkpoint_workflow(preset, runtime.names[f"{preset}/kohya"]))
    ref = result.outputs["5"]["checkpoints"][0]
    assert (ref["subfolder"], ref["filename"], ref["type"]) == ("checkpoints", "fused_00001_.safetensors", "output")
    path = tmp_path / "out" / "checkpoints" / "fused_00001_.safetensors"

    fused = pool_from(runtime.resources).pipeline(result.value("4"))
    config = export.save_config_skeleton(fused, tmp_path / "config")
    loaded = getattr(diffusers, PIPELINES[preset]).from_single_file(
        str(path), config=str(config), torch_dtype=torch.float32, local_files_only=True)
    plain = presets.build_pipeline(preset, dtype="fp32", device="cpu")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours = getattr(fused, name, None)
        if ours is None:
            continue
        want, got = ours.state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), f"{preset} {name}: keys differ"
        differing = [k for k in want if not torch.equal(want[k], got[k])]
        assert not differing, f"{preset} {name}: loaded weights differ from the fused model, e.g. {differing[:3]}"
    unet_plain = plain.unet.state_dict()
    changed = [k for k, v in fused.unet.state_dict().items() if not torch.equal(v, unet_plain[k])]
    assert changed, "the checkpoint must hold the fused weights, not the plain base"


def test_checkpoint_has_the_original_key_layout_and_never_overwrites(runtime, tmp_path):
    wf = checkpoint_workflow("tiny-sd15", runtime.names["tiny-sd15/kohya"], prefix="ckpt")
    first = runtime.run(wf).outputs["5"]["checkpoints"][0]["filename"]
    second = runtime.run(wf, overrides={"3.weight": 0.5}).outputs["5"]["checkpoints"][0]["filename"]
    assert (first, second) == ("ckpt_00001_.safetensors", "ckpt_00002_.safetensors")
    with safe_open(str(tmp_path / "out" / first), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys, "UNet keys in the LDM layout"
    assert "first_stage_model.post_quant_conv.weight" in keys, "VAE keys in the LDM layout"
    assert metadata["arch"] == "sd15" and metadata["writer"] == export.SINGLE_FILE_FORMAT
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [first, second], "no temp file may be left"


def test_prefix_outside_the_output_folder_is_refused(runtime):
    from loraloom.graph_runtime import ValidationError

    with pytest.raises(ValidationError, match="filename_prefix"):
        runtime.run(checkpoint_workflow("tiny-sd15", runtime.names["tiny-sd15/kohya"], prefix="../escape"))


@pytest.mark.parametrize("preset", presets.preset_names("transformer"))
def test_dit_checkpoint_is_the_fused_transformer_and_loads_back_bit_exactly(runtime, tmp_path, preset):
    """On Flux / SD3.5 the file holds the transformer alone, in the original layout; LoadBase reads it
    with a diffusers folder that brings the text encoders and VAE."""
    from loraloom.bases import load_base

    result = runtime.run(checkpoint_workflow(preset, runtime.names[f"{preset}/kohya"]))
    path = tmp_path / "out" / "checkpoints" / "fused_00001_.safetensors"
    fused = pool_from(runtime.resources).pipeline(result.value("4"))
    plain = presets.build_pipeline(preset, dtype="fp32", device="cpu")
    loaded = load_base(path, config=export.save_diffusers_folder(plain, tmp_path / "config"), dtype="fp32",
                       device="cpu").pipeline
    want, got = fused.transformer.state_dict(), loaded.transformer.state_dict()
    assert want.keys() == got.keys() and not [k for k in want if not torch.equal(want[k], got[k])]
    assert [k for k, v in plain.transformer.state_dict().items() if not torch.equal(v, want[k])], "fused weights"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["arch"] == presets.PRESETS[preset].arch
        assert not [k for k in f.keys() if k.startswith(("vae.", "text_encoder", "first_stage_model."))]
