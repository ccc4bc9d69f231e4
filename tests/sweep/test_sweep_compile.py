"""A sweep over a compiled model: the denoiser compiles once, at the first cell; weight and fuse-scale
changes from cell to cell re-patch weights and never recompile."""

import json
from pathlib import Path

import torch

from loraloom.api import Runtime

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "fuse_compile_api.json"


def test_a_sweep_on_a_compiled_model_compiles_once(tmp_path):
    from torch._dynamo.utils import counters

    prompt = json.loads(WORKFLOW.read_text())
    prompt["5"]["inputs"].update(steps=2, width=64, height=64)
    prompt["1"]["inputs"].update(dtype="fp32", device="cpu")
    del prompt["9"]  # SavePipeline: not what this test is about (a sweep runs only the images' nodes)
    torch._dynamo.reset()
    counters.clear()  # what earlier tests compiled in this process is not this sweep's
    rt = Runtime(output_dir=tmp_path, demo_loras=True)
    result = rt.sweep(prompt, {"4.weight": [0.3, 0.9], "6.lora_scale": [0.5, 1.0]})
    assert not result.failed and len(result.ran) == 4
    records = [result.records[i] for i in result.plan.order]
    assert sum(r.compiles for r in records) == 1, "the pool compiles the denoiser once for the whole grid"
    assert all(r.patched_layers > 0 for r in records), "every cell is a new model state: re-patched"
    assert counters["stats"]["unique_graphs"] == 1, (
        f"weight and fuse changes recompiled the denoiser: {counters['stats']['unique_graphs']} graphs")
