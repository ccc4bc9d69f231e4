"""run_cell: a cell computes its image sources only (no file written), returns plain data, and a
failing cell is a result, not an exception."""

from pathlib import Path

import numpy as np
import pytest

from loraloom.api import Runtime
from loraloom.graph_runtime import load_workflow
from loraloom.sweep.cell import Cell, image_sources, run_cell

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "blend_api.json"


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return Runtime(output_dir=tmp_path_factory.mktemp("out"), demo_loras=True)


def test_cell_returns_the_image_the_workflow_saves_and_writes_nothing(rt):
    prompt = load_workflow(WORKFLOW, rt.registry).prompt
    sources = image_sources(prompt)
    assert sources, "blend_api.json has a SaveImage fed by a Sample"
    cell = Cell(0, (0,), {}, prompt, sources)
    result = run_cell(rt, cell)
    assert result.ok, result.error
    assert list(rt.folders.output_dir.rglob("*.png")) == [], "a cell writes no file"
    saved = rt.run(prompt)  # the plain workflow: its SaveImage writes the PNG
    (out_node,) = sources
    from PIL import Image

    written = np.asarray(Image.open(rt.folders.output_dir / saved.outputs[out_node]["images"][0]["filename"]))
    assert np.array_equal(result.images[out_node][0], written), "the cell's pixels are the saved PNG's"
    again = run_cell(rt, cell)
    assert again.patched_layers == 0 and not again.executed, "a repeated cell re-runs and re-patches nothing"


def test_a_failing_cell_is_a_result_naming_the_node(rt):
    prompt = load_workflow(WORKFLOW, rt.registry).prompt
    lora = next(nid for nid, n in prompt.items() if n["class_type"] == "LoraLoomLoadLoRA")
    prompt[lora]["inputs"]["lora_name"] = "no-such.safetensors"
    result = run_cell(rt, Cell(3, (1,), {}, prompt, image_sources(prompt)))
    assert not result.ok and result.index == 3
    assert "no-such.safetensors" in str(result.error), result.error
