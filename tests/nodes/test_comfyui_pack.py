"""The repo as a ComfyUI custom node pack: imported the way ComfyUI imports custom_nodes/<pack>, under
another package name, cheaply, and its nodes called the way ComfyUI's executor calls them."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


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


def test_node_reference_doc_is_current():
    from loraloom.cli import nodes_markdown
    from loraloom.graph_runtime import NodeRegistry
    from loraloom.nodes import BUILTIN

    doc = (ROOT / "docs" / "nodes.md").read_text()
    assert doc == nodes_markdown(NodeRegistry(BUILTIN)), "docs/nodes.md is stale: run `loraloom nodes --markdown > docs/nodes.md`"
