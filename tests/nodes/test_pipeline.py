"""SavePipeline: the saved folder samples what the recipe samples."""

import torch


def test_save_pipeline_writes_the_fused_model(runtime, tmp_path):
    from loraloom.bases.loading import load_base

    wf = {
        "1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "dtype": "fp32", "device": "cpu"}},
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": runtime.names["tiny-sd15/kohya"]}},
        "3": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": 0.8}},
        "4": {"class_type": "Fuse", "inputs": {"model": ["3", 0]}},
        "5": {"class_type": "SavePipeline", "inputs": {"model": ["4", 0], "filename_prefix": "pipes/fused"}},
        "6": {"class_type": "Sample", "inputs": {"model": ["4", 0], "steps": 2, "width": 64, "height": 64}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    result = runtime.run(wf)
    ref = result.outputs["5"]["pipelines"][0]
    folder = tmp_path / "out" / ref["subfolder"] / ref["filename"]
    pipe = load_base(folder, dtype="fp32", device="cpu").pipeline
    image = pipe(prompt="a photo of a cat", num_inference_steps=2, width=64, height=64, guidance_scale=7.0,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images.permute(0, 2, 3, 1)
    assert torch.allclose(image, result.value("6"), atol=1e-5), "the saved pipeline samples what the recipe samples"


def test_saved_folder_and_files_get_the_modes_the_umask_gives(runtime, tmp_path):
    """Like any folder and file made under the umask (022: 0755 and 0644), not a temp folder's 0700
    or a temp file's 0600."""
    import os
    import stat

    wf = {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "dtype": "fp32", "device": "cpu"}},
          "2": {"class_type": "SavePipeline", "inputs": {"model": ["1", 0], "filename_prefix": "pipes/p"}}}
    old = os.umask(0o022)
    try:
        ref = runtime.run(wf).outputs["2"]["pipelines"][0]
    finally:
        os.umask(old)
    folder = tmp_path / "out" / ref["subfolder"] / ref["filename"]
    modes = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert any(name.endswith(".safetensors") for name in modes), modes
    wrong = {name: f"{mode:o}" for name, mode in modes.items()
             if mode != (0o755 if (folder / name).is_dir() else 0o644)}
    assert not wrong, f"folders must be 755 and files 644 under umask 022: {wrong}"
