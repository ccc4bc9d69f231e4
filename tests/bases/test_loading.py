"""bases/loading.py (load_base) offline: presets, diffusers folders, single-file checkpoints with a
config folder; round trips are bit-identical; fingerprints; errors that say what to do."""
import json
import os
import shutil
from pathlib import Path

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


@pytest.mark.parametrize("name", presets.preset_names("unet"))
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
    assert folder.fingerprint.startswith("folder:sha256:")
    copy = shutil.copytree(files["folder"], tmp_path / "elsewhere")
    assert load_base(copy, dtype="fp32", device="cpu").fingerprint == folder.fingerprint, "same content, same fingerprint"
    scheduler = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    config["timestep_spacing"] = "trailing"
    scheduler.write_text(json.dumps(config))
    assert load_base(copy, dtype="fp32", device="cpu").fingerprint != folder.fingerprint, "a changed config must change it"
    single = load_base(files["single_file"], config=files["config"], dtype="fp32", device="cpu")
    assert single.fingerprint.startswith("single-file:sha256:") and "+config:sha256:" in single.fingerprint


def test_single_file_with_config_of_other_arch_is_refused(tiny_model_files):
    path = tiny_model_files("tiny-sd15")["single_file"]
    with pytest.raises(ValueError, match="is sd15, but config folder .* describes sdxl"):
        load_base(path, config=tiny_model_files("tiny-sdxl")["config"], dtype="fp32", device="cpu")


def test_missing_source_lists_presets(tmp_path):
    with pytest.raises(ValueError, match="neither a preset \\(tiny-sd15, tiny-sdxl, tiny-sdxl-shapes, tiny-flux, tiny-sd3\\) nor an existing file or folder"):
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


# --------------------------------------------------------------------- files from strangers
# A base's files get the checks LoRA files get, before diffusers opens them: every refusal is a
# BaseModelError naming the file, the key, the value and the limit.


def _refused(source, **kwargs):
    from loraloom.bases.arch import BaseModelError

    with pytest.raises(BaseModelError) as info:
        load_base(source, dtype="fp32", device="cpu", **kwargs)
    return info.value


def _edit_json(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _nan_weights(path, key_index=0):
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    key = sorted(tensors)[key_index]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path))
    return key


FOLDER_CASES = {
    # case: (file, change, key, value, limit)
    "sample_size 10^9": ("unet/config.json", {"sample_size": 10**9}, "sample_size", 10**9, 4096),
    "huge block_out_channels": ("unet/config.json", {"block_out_channels": [8, 16, 32, 2**20]}, "block_out_channels",
                                2**20, 8192),
    "huge vocab": ("text_encoder/config.json", {"vocab_size": 2**31}, "vocab_size", 2**31, 2**20),
    "endless scheduler": ("scheduler/scheduler_config.json", {"num_train_timesteps": 10**9}, "num_train_timesteps",
                          10**9, 100_000),
    "class that is no model": ("model_index.json", {"unet": ["os", "system"]}, "unet", ["os", "system"], None),
    "unknown component": ("model_index.json", {"controlnet": ["diffusers", "ControlNetModel"]}, "controlnet",
                          ["diffusers", "ControlNetModel"], None),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_folder_configs_are_bounded_before_diffusers_reads_them(tiny_model_files, tmp_path, case):
    rel, change, key, value, limit = FOLDER_CASES[case]
    folder = shutil.copytree(tiny_model_files("tiny-sd15")["folder"], tmp_path / "model")
    _edit_json(folder / rel, **change)
    err = _refused(folder)
    assert err.file == str(folder / rel) and err.key == key and err.value == value, f"{case}: {err!r} {err.fields()}"
    if limit is not None:
        assert err.limit == limit, f"{case}: {err.fields()}"
    assert str(folder / rel) in str(err), str(err)


@pytest.mark.parametrize("text", ['{"in_channels": 4,', '{"in_channels": NaN}', '[4]', '{"a": 1, "a": 2}', "\xff"])
def test_malformed_config_json_is_refused_naming_the_file(tiny_model_files, tmp_path, text):
    folder = shutil.copytree(tiny_model_files("tiny-sd15")["folder"], tmp_path / "model")
    path = folder / "vae" / "config.json"
    path.write_bytes(text.encode("latin-1"))
    err = _refused(folder)
    assert err.file == str(path), err.fields()


def test_config_that_asks_more_than_its_weights_hold_is_refused(tiny_model_files, tmp_path):
    folder = shutil.copytree(tiny_model_files("tiny-sd15")["folder"], tmp_path / "model")
    path = folder / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    _edit_json(path, vocab_size=config["vocab_size"] * 4)
    err = _refused(folder)
    assert err.kind == "config_mismatch" and err.file == str(path), err.fields()
    assert err.limit + 3 * config["vocab_size"] * config["hidden_size"] == err.value, err.fields()
    assert "token_embedding.weight" in str(err) and "model.safetensors" in str(err), str(err)


def test_config_of_the_wrong_type_is_refused(tiny_model_files, tmp_path):
    folder = shutil.copytree(tiny_model_files("tiny-sd15")["folder"], tmp_path / "model")
    _edit_json(folder / "unet" / "config.json", block_out_channels="wide")
    err = _refused(folder)
    assert err.file == str(folder / "unet" / "config.json") and err.kind == "bad_config", err.fields()


def test_folder_weights_get_the_lora_checks(tiny_model_files, tmp_path):
    folder = shutil.copytree(tiny_model_files("tiny-sd15")["folder"], tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    key = _nan_weights(weights)
    err = _refused(folder)
    assert (err.file, err.key, err.value, err.limit) == (str(weights), key, 1, 0), err.fields()
    assert "NaN" in str(err) and "checkpoint" in err.fix, str(err)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = _refused(folder)
    assert err.file == str(weights) and "truncated" in str(err), err.fields()


def test_pickle_weights_in_a_folder_are_refused(tiny_model_files, tmp_path):
    folder = shutil.copytree(tiny_model_files("tiny-sd15")["folder"], tmp_path / "model")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save({"x": torch.zeros(1)}, weights.with_suffix(".bin"))
    weights.unlink()
    err = _refused(folder)
    assert err.kind == "pickle" and err.file == str(weights.with_suffix(".bin")), err.fields()


@pytest.mark.parametrize("damage", ["nan", "truncated", "pickle inside", "header bomb"])
def test_single_file_gets_the_lora_checks(tiny_model_files, tmp_path, damage):
    files = tiny_model_files("tiny-sd15")
    path = shutil.copy(files["single_file"], tmp_path / "model.safetensors")
    if damage == "nan":
        key = _nan_weights(path, key_index=5)
    elif damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:-1000])
    elif damage == "pickle inside":
        torch.save({"x": torch.zeros(1)}, path)
    else:
        header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                             for i in range(60_000)}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header)
    err = _refused(path, config=files["config"])
    assert err.file == str(path), err.fields()
    if damage == "nan":
        assert (err.key, err.value, err.limit) == (key, 1, 0), err.fields()
    elif damage == "pickle inside":
        assert "pickle" in str(err), str(err)
    elif damage == "header bomb":
        assert (err.value, err.limit) == (60_000, 50_000), err.fields()


def test_single_file_config_asking_more_than_the_file_holds_is_refused(tiny_model_files, tmp_path):
    files = tiny_model_files("tiny-sd15")
    config = shutil.copytree(files["config"], tmp_path / "config")
    _edit_json(config / "text_encoder" / "config.json", vocab_size=2**20)
    err = _refused(files["single_file"], config=config)
    assert err.kind == "config_mismatch" and err.file == str(config), err.fields()
    assert err.value > err.limit and str(files["single_file"]) in str(err), str(err)


def test_weights_are_scanned_once_per_file_state(tiny_model_files, monkeypatch):
    from loraloom.bases import checks

    calls = []
    scan = checks.scan_file
    monkeypatch.setattr(checks, "scan_file", lambda *a, **k: calls.append(a[0]) or scan(*a, **k))
    monkeypatch.setattr(checks, "_scanned", {})
    monkeypatch.setattr(checks, "RACY_NS", 0)  # the fixture's files may be younger than a timestamp tick
    path = tiny_model_files("tiny-sd15")["single_file"]
    for _ in range(2):
        load_base(path, config=tiny_model_files("tiny-sd15")["config"], dtype="fp32", device="cpu")
    assert calls == [path], "an unchanged file is read through once"


@pytest.mark.parametrize("rel", ["tokenizer/tokenizer.json", "unet/diffusion_pytorch_model.safetensors"])
def test_a_fifo_in_a_folder_is_refused_not_waited_on(tiny_model_files, tmp_path, rel):
    import threading

    folder = shutil.copytree(tiny_model_files("tiny-sd15")["folder"], tmp_path / "model")
    (folder / rel).unlink()
    os.mkfifo(folder / rel)
    outcome = []

    def attempt():
        try:
            load_base(folder, dtype="fp32", device="cpu")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(120)
    if not outcome:  # a library waits on the FIFO: give a waiting reader its writer (never wait here), then fail
        try:
            os.close(os.open(folder / rel, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        pytest.fail(f"loading waited on the FIFO {rel}")
    from loraloom.bases.arch import BaseModelError

    assert isinstance(outcome[0], BaseModelError), repr(outcome[0])
    assert outcome[0].file == str(folder / rel) and "named pipe" in str(outcome[0]), outcome[0].fields()


def test_weights_are_read_once_for_their_check_and_the_fingerprint(tiny_model_files, monkeypatch):
    from loraloom.bases import checks, loading
    from loraloom.graph_runtime import cache, file_fingerprint

    for module, name in ((checks, "_scanned"), (cache, "_fingerprints"), (loading, "_checked_folders")):
        monkeypatch.setattr(module, name, {})
    for module in (checks, cache):
        monkeypatch.setattr(module, "RACY_NS", 0)  # the fixture's files may be younger than a timestamp tick
    hashed = []
    hash_open_file = cache._hash_open_file
    monkeypatch.setattr(cache, "_hash_open_file",
                        lambda f, state: hashed.append(state.inode) or hash_open_file(f, state))
    folder = Path(tiny_model_files("tiny-sd15")["folder"])
    weights = {p.stat().st_ino: p for p in folder.rglob("*.safetensors")}
    loaded = load_base(folder, dtype="fp32", device="cpu")
    assert weights and not [weights[i] for i in hashed if i in weights], "the check's read hashed them"
    assert hashed, "the folder's other files are hashed by file_fingerprint itself"
    monkeypatch.setattr(cache, "_fingerprints", {})
    assert loaded.fingerprint == "folder:sha256:" + file_fingerprint(folder), "the same digest as a hash of its own"


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see file mappings")
def test_weights_are_read_once_into_one_owned_buffer_per_file_bit_for_bit(tiny_model_files):
    # Each weights file is read whole into one buffer and the weights view it (no copy per weight),
    # each 64-byte aligned: what diffusers loaded, bit for bit, in memory the process owns.
    from diffusers import StableDiffusionXLPipeline

    folder = tiny_model_files("tiny-sdxl")["folder"]
    base = load_base(folder, dtype="fp32", device="cpu")
    reference = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    for name in COMPONENTS:
        ours, theirs = getattr(base.pipeline, name).state_dict(), getattr(reference, name).state_dict()
        assert list(ours) == list(theirs), name
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), f"{name}.{key}"
        (weights,) = (Path(folder) / name).glob("*.safetensors")
        storages = {t.untyped_storage().data_ptr() for t in ours.values() if t.numel()}
        assert len(storages) == 1, f"{name}: one buffer for its one weights file"
        assert all(t.data_ptr() % 64 == 0 for t in ours.values()), name
        assert next(iter(ours.values())).untyped_storage().nbytes() < weights.stat().st_size + 64 * len(ours)
