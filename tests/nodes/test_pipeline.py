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
    or a temp file's 0600: the pipeline folder and every other output, previews included."""
    import os
    import stat

    wf = {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "dtype": "fp32", "device": "cpu"}},
          "2": {"class_type": "SavePipeline", "inputs": {"model": ["1", 0], "filename_prefix": "pipes/p"}},
          "3": {"class_type": "SaveCheckpoint", "inputs": {"model": ["1", 0], "filename_prefix": "ckpt/c"}},
          "4": {"class_type": "Sample", "inputs": {"model": ["1", 0], "steps": 1, "width": 64, "height": 64}},
          "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0]}},
          "6": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
          "7": {"class_type": "LoadLoRA", "inputs": {"lora_name": "demo-a.safetensors"}},
          "8": {"class_type": "SaveLoRA", "inputs": {"lora": ["7", 0]}}}
    old = os.umask(0o022)
    try:
        runtime.run(wf)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    for saved in ("pipes/p_00001/unet/diffusion_pytorch_model.safetensors", "ckpt/c_00001_.safetensors",
                  "ComfyUI_00001_.png", "temp/preview_00001_.png", "loras/loraloom_00001_.safetensors"):
        assert saved in modes, "\n".join(sorted(modes))
    wrong = {name: f"{mode:o}" for name, mode in modes.items() if mode != (0o755 if (out / name).is_dir() else 0o644)}
    assert not wrong, f"folders must be 755 and files 644 under umask 022: {wrong}"


def test_saved_flux_pipeline_loads_in_diffusers_and_samples_as_the_fused_model(runtime, tmp_path):
    """diffusers' own FluxPipeline.from_pretrained reads the SavePipeline folder of a fused tiny-flux
    (no LoRA Loom code on the way back) and samples what the Sample node samples from the recipe."""
    from diffusers import FluxPipeline

    prompt = "a photo of a cat"
    wf = {
        "1": {"class_type": "LoadBase", "inputs": {"source": "tiny-flux", "dtype": "fp32", "device": "cpu"}},
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": runtime.names["tiny-flux/kohya"]}},
        "3": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": 0.8}},
        "4": {"class_type": "Fuse", "inputs": {"model": ["3", 0]}},
        "5": {"class_type": "SavePipeline", "inputs": {"model": ["4", 0], "filename_prefix": "pipes/flux"}},
        "6": {"class_type": "Sample", "inputs": {"model": ["4", 0], "prompt": prompt, "steps": 2, "guidance": 3.5,
                                                 "width": 64, "height": 64}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "Sample", "inputs": {"model": ["1", 0], "prompt": prompt, "steps": 2, "guidance": 3.5,
                                                 "width": 64, "height": 64}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    result = runtime.run(wf)
    ref = result.outputs["5"]["pipelines"][0]
    pipe = FluxPipeline.from_pretrained(tmp_path / "out" / ref["subfolder"] / ref["filename"], local_files_only=True)
    image = pipe(prompt=prompt, num_inference_steps=2, width=64, height=64, guidance_scale=3.5,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images.permute(0, 2, 3, 1)
    assert torch.allclose(image, result.value("6"), atol=1e-5), \
        f"the saved pipeline samples what the recipe samples: {(image - result.value('6')).abs().max():.2e} off"
    assert not torch.allclose(result.value("6"), result.value("8"), atol=1e-3), "the LoRA must change the image"
