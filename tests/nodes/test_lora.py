"""LoadLoRA and SaveLoRA: a changed file is read again; saving never overwrites."""

SAVE = {"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "demo-a.safetensors"}},
        "4": {"class_type": "SaveLoRA", "inputs": {"lora": ["1", 0], "filename_prefix": "merged", "format": "kohya",
                                                   "dtype": "fp32"}}}


def test_changed_lora_file_reruns_its_loader(runtime, loras_dir, blend):
    root, names = loras_dir
    wf = blend(names["tiny-sdxl/kohya"])
    first = runtime.run(wf)
    (root / names["tiny-sdxl/kohya"]).write_bytes((root / names["tiny-sdxl/kohya-sgm"]).read_bytes())
    again = runtime.run(wf)
    assert "2" in again.executed, "new content: the LoadLoRA must read the file again"
    assert again.value("2").fingerprint != first.value("2").fingerprint


def test_save_lora_never_overwrites(runtime, tmp_path):
    first = runtime.run(SAVE).outputs["4"]["loras"][0]["filename"]
    second = runtime.run(SAVE, overrides={"4.dtype": "fp16"}).outputs["4"]["loras"][0]["filename"]
    assert (first, second) == ("merged_00001_.safetensors", "merged_00002_.safetensors")
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_merged_lora_metadata_names_sources_relative_to_their_folder_never_absolute(runtime, loras_dir, tmp_path):
    """A merge is shared: its metadata must not tell where its sources lay or whose home that was.
    Each source is named as LoadLoRA names it (relative to its LoRA folder), with its content hash."""
    import getpass
    import json
    import shutil
    from pathlib import Path

    from safetensors import safe_open

    root, _ = loras_dir
    (root / "styles").mkdir()
    shutil.copy(Path(runtime.folders.lora_dirs[-1]) / "demo-a.safetensors", root / "styles" / "a.safetensors")
    wf = {"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "styles/a.safetensors"}},
          "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": "demo-b.safetensors"}},
          "3": {"class_type": "PeftMerge", "inputs": {"lora_a": ["1", 0], "weight_a": 1.0, "lora_b": ["2", 0],
                                                      "weight_b": 0.5, "method": "cat"}},
          "4": {"class_type": "SaveLoRA", "inputs": {"lora": ["3", 0], "filename_prefix": "merged", "format": "kohya",
                                                     "dtype": "fp32"}}}
    result = runtime.run(wf)
    ref = result.outputs["4"]["loras"][0]
    with safe_open(tmp_path / "out" / ref["filename"], "pt") as f:
        metadata = f.metadata()
    sources = json.loads(metadata["loraloom.merge_sources"])
    assert sources == [{"name": "styles/a.safetensors", "fingerprint": result.value("1").fingerprint},
                       {"name": "demo-b.safetensors", "fingerprint": result.value("2").fingerprint}], sources
    text = json.dumps(metadata)
    for private in (str(tmp_path), str(Path.home()), f"/{getpass.getuser()}/", str(root)):
        assert private not in text, f"the metadata holds {private!r}"
    assert not [v for v in metadata.values() if v.startswith("/")], "no absolute path"


def test_save_lora_expands_comfyui_prefix_variables(runtime, tmp_path):
    import time

    wf = {**SAVE, "4": {**SAVE["4"], "inputs": {**SAVE["4"]["inputs"],
                                                "filename_prefix": "%date:yyyy%/%LoadLoRA.lora_name%_%width%"}}}
    years = {time.localtime().tm_year}
    ref = runtime.run(wf).outputs["4"]["loras"][0]
    years.add(time.localtime().tm_year)
    assert ref["filename"] == "demo-a.safetensors_0_00001_.safetensors", "%width% is 0 for what is not an image"
    assert ref["subfolder"] in {str(y) for y in years}, ref
    assert (tmp_path / "out" / ref["subfolder"] / ref["filename"]).is_file()


# Runs with outputs=["1"]: node 4 is there because a workflow needs an output node.
LOAD = {"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "x.safetensors"}},
        "4": {"class_type": "SaveLoRA", "inputs": {"lora": ["1", 0], "filename_prefix": "x", "format": "kohya",
                                                   "dtype": "fp32"}}}


def _swap_when_loading(path, data):
    """A listener that rewrites ``path`` with ``data`` as LoadLoRA starts (after the run keyed it)."""
    def listener(event):
        if event["event"] == "executing" and event["class_type"] == "LoadLoRA":
            path.write_bytes(data)
    return listener


def test_a_lora_replaced_during_a_run_is_cached_under_the_bytes_read(runtime, loras_dir):
    from loraloom.graph_runtime import file_fingerprint

    root, names = loras_dir
    path = root / "x.safetensors"
    old, new = (root / names["tiny-sdxl/kohya"]).read_bytes(), (root / names["tiny-sdxl/kohya-sgm"]).read_bytes()
    path.write_bytes(old)
    old_fp = file_fingerprint(path)
    changed = runtime.run(LOAD, outputs=["1"], on_event=_swap_when_loading(path, new))
    new_fp = file_fingerprint(path)
    assert changed.value("1").fingerprint == new_fp != old_fp, "the run used the bytes it read"
    path.write_bytes(old)  # put back
    back = runtime.run(LOAD, outputs=["1"])
    assert back.executed == ["1"] and back.value("1").fingerprint == old_fp, \
        "the new bytes' result was not stored under the old content's key"
    path.write_bytes(new)
    again = runtime.run(LOAD, outputs=["1"])
    assert again.cached == ["1"] and again.value("1").fingerprint == new_fp, \
        "it was stored under the key of the bytes it was computed from"


def test_strict_files_fails_a_loader_whose_file_changed_during_the_run(loras_dir, tmp_path):
    import pytest

    from loraloom import ExecutionError, Runtime

    root, names = loras_dir
    path = root / "x.safetensors"
    old, new = (root / names["tiny-sdxl/kohya"]).read_bytes(), (root / names["tiny-sdxl/kohya-sgm"]).read_bytes()
    path.write_bytes(old)
    rt = Runtime(lora_dirs=[root], output_dir=tmp_path / "out", strict_files=True)
    with pytest.raises(ExecutionError) as info:
        rt.run(LOAD, outputs=["1"], on_event=_swap_when_loading(path, new))
    assert info.value.kind == "changed_while_reading" and info.value.node == "1", info.value
    assert "x.safetensors" in str(info.value) and "Fix:" in str(info.value), str(info.value)
    assert rt.run(LOAD, outputs=["1"]).executed == ["1"], "nothing was cached from the failed run"


def test_a_huge_lora_is_refused_at_validation_before_hashing(runtime, loras_dir):
    import time

    import pytest

    from loraloom import ValidationError

    root, _ = loras_dir
    with open(root / "x.safetensors", "wb") as f:
        f.truncate(10 * 2**30)  # sparse: instant to make, 66 s to hash
    start = time.monotonic()
    with pytest.raises(ValidationError) as info:
        runtime.run(LOAD, outputs=["1"])
    assert time.monotonic() - start < 5, "refused on its size, not after hashing 10 GB"
    assert "max_file_bytes" in str(info.value) and "x.safetensors" in str(info.value), str(info.value)


def test_odd_files_are_not_offered_as_loras(runtime, loras_dir):
    import os

    root, names = loras_dir
    os.mkfifo(root / "pipe.safetensors")
    os.symlink("/dev/zero", root / "zero.safetensors")
    offered = runtime.folders.list("loras", (".safetensors",))
    assert names["tiny-sdxl/kohya"] in offered
    assert "pipe.safetensors" not in offered and "zero.safetensors" not in offered, offered


def test_a_refused_lora_name_says_why(runtime, loras_dir, tmp_path):
    """Not only "is not one of [...]": a name no folder may offer is refused with its reason."""
    import os

    import pytest

    from loraloom import ValidationError

    root, names = loras_dir
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes((root / names["tiny-sdxl/kohya"]).read_bytes())
    os.symlink(outside, root / "link.safetensors")
    cases = {"../secret.safetensors": "contains a '..' part", str(outside): "is an absolute path",
             "link.safetensors": "outside the folder", "a\\b.safetensors": "contains a backslash"}
    for name, reason in cases.items():
        wf = {**LOAD, "1": {"class_type": "LoadLoRA", "inputs": {"lora_name": name}}}
        with pytest.raises(ValidationError) as info:
            runtime.validate(wf)
        text = str(info.value)
        assert reason in text and "is not one of" not in text, f"{name!r}: {text}"
        error = info.value.node_errors["1"]["errors"][0]
        assert error["extra_info"]["input_name"] == "lora_name" and error["extra_info"]["value"] == name, error


def test_a_saved_lora_is_offered_and_loads_in_the_next_run(runtime, loras_dir, tmp_path):
    """SaveLoRA writes into the output folder's loras/; LoadLoRA offers it as ComfyUI names a file of
    its output folder ("<path> [output]"), which never collides with a LoRA folder's file of that path."""
    import shutil

    import torch

    root, names = loras_dir
    saved = runtime.run(SAVE_IN_LORAS).outputs["4"]["loras"][0]
    name = f"{saved['subfolder']}/{saved['filename']} [output]"
    assert name == "loras/merged_00001_.safetensors [output]"
    # the same path in a LoRA folder: another file, offered under its own name
    (root / "loras").mkdir()
    shutil.copy(root / names["tiny-sdxl/kohya"], root / "loras" / saved["filename"])
    # a save in progress stages its file in a hidden folder beside its name: never offered
    staging = tmp_path / "out" / "loras" / ".merged_00002_.safetensors.abcdef-1.x.tmp"
    staging.mkdir()
    (staging / "merged_00002_.safetensors").write_bytes(b"half")
    offered = runtime.folders.list("loras", (".safetensors",))
    assert name in offered and f"loras/{saved['filename']}" in offered, offered
    assert not [n for n in offered if "00002" in n], offered

    again = runtime.run({"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": name}},
                         "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": "demo-a.safetensors"}},
                         "3": {"class_type": "SaveLoRA", "inputs": {"lora": ["1", 0], "filename_prefix": "again",
                                                                    "dtype": "fp32"}},
                         "4": {"class_type": "SaveLoRA", "inputs": {"lora": ["2", 0], "filename_prefix": "orig",
                                                                    "dtype": "fp32"}}})
    from loraloom.lora.canonical import delta

    loaded, original = again.value("1"), again.value("2")
    assert loaded.path == str(tmp_path / "out" / "loras" / saved["filename"]), loaded.path
    for component, modules in original.components.items():
        for prefix, module in modules.items():
            assert torch.allclose(delta(loaded.components[component][prefix]), delta(module), atol=1e-6), prefix
    from loraloom.nodes.common import lora_source_name

    with runtime.context():
        assert lora_source_name(loaded) == name, "a merge's provenance names it as LoadLoRA lists it"


SAVE_IN_LORAS = {**SAVE, "4": {**SAVE["4"], "inputs": {**SAVE["4"]["inputs"], "filename_prefix": "loras/merged"}}}


def test_an_output_name_outside_the_output_folder_is_refused_with_output_advice(runtime):
    import pytest

    from loraloom import ValidationError

    with pytest.raises(ValidationError) as info:
        runtime.validate({**SAVE, "4": {**SAVE["4"], "inputs": {**SAVE["4"]["inputs"], "filename_prefix": "../x"}}})
    fix = info.value.node_errors["4"]["errors"][0]["extra_info"]["fix"]
    assert "--output-dir" in fix and "--lora-dir" not in fix, fix
