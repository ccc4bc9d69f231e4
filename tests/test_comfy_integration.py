"""The repo as a ComfyUI custom node pack: imported the way ComfyUI imports custom_nodes/<pack>, under
another package name, cheaply, and its nodes called the way ComfyUI's executor calls them."""

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_as_comfyui_does(name="ComfyUI-LoRA-Loom"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_import_is_cheap_and_torch_free():
    code = "import loraloom, sys; print('torch' in sys.modules, 'diffusers' in sys.modules, len(loraloom.NODE_CLASS_MAPPINGS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["False", "False"], "importing the pack must not import torch or diffusers"
    assert int(out[2]) >= 8


def test_mappings_under_another_package_name():
    pack = load_as_comfyui_does()
    mappings = pack.NODE_CLASS_MAPPINGS
    for node_id in ("LoadBase", "LoadLoRA", "WeightedBlend", "PeftMerge", "Fuse", "Compile", "Sample", "SaveLoRA",
                    "SavePipeline", "SaveCheckpoint"):
        assert node_id in mappings, f"{node_id} missing from NODE_CLASS_MAPPINGS"
        cls = mappings[node_id]
        assert cls.CATEGORY.startswith("LoRA Loom"), cls.CATEGORY
        assert callable(getattr(cls, cls.FUNCTION)) and isinstance(cls.INPUT_TYPES(), dict)
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert "SaveImage" not in mappings and "PreviewImage" not in mappings, \
        "ComfyUI drops pack nodes with core ids; ours stand in for them headless only"
    for cls in mappings.values():
        for kind in cls.RETURN_TYPES:
            assert kind not in ("MODEL", "CLIP", "LORA"), "ComfyUI's own socket types carry other objects"


def test_nodes_run_as_comfyui_calls_them():
    pack = load_as_comfyui_does("loraloom_comfy_call")
    nodes = pack.NODE_CLASS_MAPPINGS

    def call(node_id, **inputs):
        cls = nodes[node_id]
        out = getattr(cls(), cls.FUNCTION)(**inputs)
        return out["result"] if isinstance(out, dict) else out

    (model,) = call("LoadBase", source="tiny-sd15", config="auto", dtype="fp32", device="cpu")
    (image,) = call("Sample", model=model, prompt="a cat", negative_prompt="", seed=1, steps=2, guidance=5.0,
                    width=64, height=64, scheduler="euler", batch_size=2, lora_scale=1.0)
    assert image.dtype == torch.float32 and tuple(image.shape) == (2, 64, 64, 3), "ComfyUI's IMAGE: [B, H, W, C]"
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_comfyui_hooks(tmp_path, monkeypatch):
    """Inside ComfyUI (its folder_paths and comfy modules importable), LoadLoRA lists ComfyUI's loras
    folders and progress goes to ComfyUI's ProgressBar; its interrupt stops us."""
    from loraloom.comfy_integration import install_if_in_comfyui
    from loraloom.graph_runtime import context

    root, names = tmp_path / "comfy-loras", {"tiny-sdxl/kohya": "sdxl/style.safetensors"}
    (root / "sdxl").mkdir(parents=True)
    (root / "sdxl" / "style.safetensors").write_bytes(b"")  # only listed, never read
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
