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
