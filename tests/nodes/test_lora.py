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
