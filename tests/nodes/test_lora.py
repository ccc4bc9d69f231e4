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
