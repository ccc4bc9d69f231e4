"""bases/loading.py (load_base) offline: presets, diffusers folders, single-file checkpoints with a
config folder; round trips are bit-identical; fingerprints; errors that say what to do."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from loraloom.bases import load_base, presets
from loraloom.bases.loading import LoadedBase

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _assert_same_weights(expected, actual, label):
    for name in COMPONENTS:
        a, b = getattr(expected, name, None), getattr(actual, name, None)
        if a is None and b is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), f"{label}: {name} keys differ: {sorted(set(sa) ^ set(sb))[:5]}"
        differing = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
        assert not differing, f"{label}: {name} weights differ, e.g. {differing[:3]}"


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_round_trips_are_bit_identical(name, tiny_model_files, tiny_sample):
    files = tiny_model_files(name)
    original = load_base(name, dtype="fp32", device="cpu")
    loaded = {
        "diffusers folder": load_base(files["folder"], dtype="fp32", device="cpu"),
        "single file + skeleton": load_base(files["single_file"], config=files["config"], dtype="fp32", device="cpu"),
        "single file + diffusers folder as config": load_base(files["single_file"], config=files["folder"], dtype="fp32", device="cpu"),
    }
    expected_image = tiny_sample(original.pipeline)
    for label, base in loaded.items():
        assert isinstance(base, LoadedBase)
        assert (base.arch, base.dtype, base.device) == (original.arch, torch.float32, torch.device("cpu")), label
        assert type(base.pipeline) is type(original.pipeline), f"{label}: got {type(base.pipeline).__name__}"
        _assert_same_weights(original.pipeline, base.pipeline, f"{name} via {label}")
        assert torch.equal(tiny_sample(base.pipeline), expected_image), f"{name} via {label}: output differs"


def test_fingerprints_follow_content(tiny_model_files, tmp_path):
    files = tiny_model_files("tiny-sd15")
    preset = load_base("tiny-sd15", dtype="fp32", device="cpu")
    assert preset.fingerprint == presets.PRESETS["tiny-sd15"].fingerprint
    folder = load_base(files["folder"], dtype="fp32", device="cpu")
    assert folder.fingerprint.startswith("folder:blake2b:")
    copy = shutil.copytree(files["folder"], tmp_path / "elsewhere")
    assert load_base(copy, dtype="fp32", device="cpu").fingerprint == folder.fingerprint, "same content, same fingerprint"
    scheduler = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    config["timestep_spacing"] = "trailing"
    scheduler.write_text(json.dumps(config))
    assert load_base(copy, dtype="fp32", device="cpu").fingerprint != folder.fingerprint, "a changed config must change it"
    single = load_base(files["single_file"], config=files["config"], dtype="fp32", device="cpu")
    assert single.fingerprint.startswith("single-file:blake2b:") and "+config:blake2b:" in single.fingerprint


def test_single_file_without_config_says_how_to_fix(tiny_model_files):
    path = tiny_model_files("tiny-sdxl")["single_file"]
    with pytest.raises(ValueError, match=rf"single-file checkpoint {path} needs a config folder.*Fix: pass config="):
        load_base(path, dtype="fp32", device="cpu")


def test_single_file_with_config_of_other_arch_is_refused(tiny_model_files):
    path = tiny_model_files("tiny-sd15")["single_file"]
    with pytest.raises(ValueError, match="is sd15, but config folder .* describes sdxl"):
        load_base(path, config=tiny_model_files("tiny-sdxl")["config"], dtype="fp32", device="cpu")


def test_missing_source_lists_presets(tmp_path):
    with pytest.raises(ValueError, match="neither a preset \\(tiny-sd15, tiny-sdxl, tiny-sdxl-shapes\\) nor an existing file or folder"):
        load_base(str(tmp_path / "nope"))


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="only .safetensors checkpoints are loaded"):
        load_base(path)


def test_lora_file_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(path))
    with pytest.raises(ValueError, match="not a full SD/SDXL single-file checkpoint"):
        load_base(path, config=tmp_path)


def test_folder_without_model_index_says_what_is_expected(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="no model_index.json; expected a diffusers folder"):
        load_base(tmp_path)


def test_config_is_refused_for_presets_and_folders(tiny_model_files):
    with pytest.raises(ValueError, match="takes no config folder"):
        load_base("tiny-sd15", config="somewhere")
    with pytest.raises(ValueError, match="carries its own configs"):
        load_base(tiny_model_files("tiny-sd15")["folder"], config="somewhere")


def _mapped_ranges(folder):
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith(str(folder)):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see file mappings")
def test_loaded_weights_do_not_live_in_the_mapped_file(tiny_model_files):
    folder = tiny_model_files("tiny-sdxl")["folder"]
    base = load_base(folder, dtype="fp32", device="cpu")
    # safetensors maps the file and may hand out views into it: a rewrite of the file would then
    # change a live model, and unaligned views change float results.
    ranges = _mapped_ranges(folder)
    for name in COMPONENTS:
        for key, tensor in getattr(base.pipeline, name).state_dict().items():
            pointer = tensor.data_ptr()
            assert not any(start <= pointer < end for start, end in ranges), f"{name}.{key} views the mapped file"
