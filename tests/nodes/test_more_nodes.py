"""Sample's schedulers and determinism, block weights on every layer, save-path rules, file edits,
and ComfyUI's folders/progress/interrupt hooks."""

import sys
import types

import pytest
import torch

from loraloom.graph_runtime import ExecutionError, ValidationError
from loraloom.nodes.sample import SCHEDULERS


def sample_wf(**inputs):
    base = {"model": ["1", 0], "prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}
    base.update(inputs)
    return {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "dtype": "fp32", "device": "cpu"}},
            "2": {"class_type": "Sample", "inputs": base},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_samples_deterministically(runtime, scheduler):
    first = runtime.run(sample_wf(scheduler=scheduler, steps=4)).value("2")
    runtime.cache.clear()
    second = runtime.run(sample_wf(scheduler=scheduler, steps=4)).value("2")
    assert torch.isfinite(first).all() and first.shape == (1, 64, 64, 3)
    assert torch.equal(first, second), f"{scheduler}: same inputs must give the same image"


def test_pndm_step_minimum_is_a_validation_error(runtime):
    with pytest.raises(ValidationError, match="node 2 \\(Sample\\) input 'steps': 2 is below 4"):
        runtime.run(sample_wf(scheduler="pndm", steps=2))


def test_batch_and_seed(runtime):
    two = runtime.run(sample_wf(batch_size=2)).value("2")
    assert two.shape[0] == 2 and not torch.equal(two[0], two[1]), "a batch holds different images"
    other = runtime.run(sample_wf(seed=8)).value("2")
    assert not torch.equal(other, runtime.run(sample_wf()).value("2")), "another seed, another image"


def blend(lora, weight=1.0, te=1.0, blocks=""):
    return {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sdxl", "dtype": "fp32", "device": "cpu"}},
            "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora}},
            "4": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": weight,
                                                            "text_encoder_weight": te, "block_weights": blocks}},
            "5": {"class_type": "Sample", "inputs": {"model": ["4", 0], "steps": 2, "width": 64, "height": 64}},
            "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}


def test_block_weights_reach_resnets_and_convs(runtime):
    locon = runtime.names["tiny-sdxl/locon"]
    result = runtime.run(blend(locon, blocks='{"unet": {"down": 0, "mid": 0, "up": 0}}'))
    recipe = result.value("4")
    scales = recipe.adapters[0].module_scales["unet"]
    resnets = [p for p in scales if ".resnets." in p]
    assert resnets and all(scales[p] == 0.0 for p in resnets), "resnet (LoCon) layers follow their block's weight"
    unet_off = runtime.run(blend(locon, weight=0.0)).value("5")
    assert torch.allclose(result.value("5"), unet_off, atol=1e-6), \
        "zero on every block must equal a zero UNet weight (diffusers' own dict leaves resnets at 1.0)"


def test_block_weight_errors_name_the_node(runtime):
    with pytest.raises(ExecutionError) as info:
        runtime.run(blend(runtime.names["tiny-sdxl/kohya"], blocks="1,0,1"))
    assert "node 4 (WeightedBlend)" in str(info.value) and "3" in str(info.value), str(info.value)


@pytest.mark.parametrize("prefix", ["../escape", "/abs/path", "a\\b"])
def test_save_prefix_outside_output_root_is_refused_before_running(runtime, prefix):
    wf = sample_wf()
    wf["3"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    with pytest.raises(ValidationError) as info:
        runtime.run(wf)
    assert "node 3 (SaveImage) input 'filename_prefix'" in str(info.value), str(info.value)


def test_changed_lora_file_reruns_its_loader(runtime, loras_dir):
    root, names = loras_dir
    wf = blend(names["tiny-sdxl/kohya"])
    first = runtime.run(wf)
    (root / names["tiny-sdxl/kohya"]).write_bytes((root / names["tiny-sdxl/kohya-sgm"]).read_bytes())
    again = runtime.run(wf)
    assert "2" in again.executed, "new content: the LoadLoRA must read the file again"
    assert again.value("2").fingerprint != first.value("2").fingerprint


def test_comfyui_hooks(tmp_path, monkeypatch, lora_files):
    """Inside ComfyUI (its folder_paths and comfy modules importable), LoadLoRA lists ComfyUI's loras
    folders and progress goes to ComfyUI's ProgressBar; its interrupt stops us."""
    from loraloom.comfy_integration import install_if_in_comfyui
    from loraloom.graph_runtime import context

    root, names = lora_files
    calls = []
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda kind: [str(root)] if kind == "loras" else []
    folder_paths.models_dir = str(tmp_path / "models")
    folder_paths.get_output_directory = lambda: str(tmp_path / "output")
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            calls.append((value, total))

    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.interrupted = False

    def throw():
        if mm.interrupted:
            raise RuntimeError("Processing interrupted")

    mm.throw_exception_if_processing_interrupted = throw
    comfy.utils, comfy.model_management = utils, mm
    for name, mod in {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils,
                      "comfy.model_management": mm}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    previous = context.current_context()
    try:
        assert install_if_in_comfyui()
        from loraloom.nodes.lora import LoadLoRA

        assert names["tiny-sdxl/kohya"] in LoadLoRA.INPUT_TYPES()["required"]["lora_name"][0]
        ctx = context.current_context()
        ctx.progress(1, 4)
        assert calls == [(1, 4)]
        mm.interrupted = True
        with pytest.raises(RuntimeError, match="interrupted"):
            ctx.progress(2, 4)
    finally:
        context.set_default_context(previous)
