"""SweepGrid in our runtime: the grid a workflow's SweepGrid node outputs is the grid `Runtime.sweep`
draws for the same axes, pixel for pixel; the image it sweeps is not rendered once plainly besides the
cells; each LoRA loads once; a bad axis is a validation error naming the node and the widget."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loraloom.api import Runtime
from loraloom.graph_runtime import ValidationError
from loraloom.nodes.image import image_uint8
from loraloom.sweep.output import MANIFEST

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "blend_api.json"
AXES = ["4.weight=0.3,0.9", "4.weight_2=0.5,1.0"]


def tiny_prompt() -> dict:
    """blend_api.json at the smallest size and two steps, its SaveImage replaced by a SweepGrid (node 7)
    whose grid a SaveImage (node 8) saves."""
    prompt = json.loads(WORKFLOW.read_text())
    prompt["5"]["inputs"].update(steps=2, width=64, height=64)
    del prompt["6"]
    prompt["7"] = {"class_type": "SweepGrid", "inputs": {"images": ["5", 0], "x_axis": AXES[0], "y_axis": AXES[1],
                                                         "z_axis": "", "seeds": ""}}
    prompt["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "grid"}}
    return prompt


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    rt = Runtime(output_dir=tmp_path_factory.mktemp("out"), demo_loras=True)
    events = []
    return rt, rt.run(tiny_prompt(), on_event=events.append), events


def test_the_grid_is_the_sweeps_grid_pixel_for_pixel(ran, tmp_path):
    rt, result, _ = ran
    plain = json.loads(WORKFLOW.read_text())
    plain["5"]["inputs"].update(steps=2, width=64, height=64)
    reference = Runtime(output_dir=tmp_path, demo_loras=True).sweep(plain, AXES)  # its own cache
    (grid_file,) = reference.grids
    expected = np.asarray(Image.open(grid_file).convert("RGB"))
    (ours,) = result.value("7")
    assert np.array_equal(image_uint8(ours), expected)
    ref = result.outputs["7"]["images"][0]
    shown = rt.folders.output_dir / ref["subfolder"] / ref["filename"]
    assert np.array_equal(np.asarray(Image.open(shown).convert("RGB")), expected), "the grid the node shows"


def test_the_swept_image_is_not_rendered_plainly_and_each_lora_loads_once(ran):
    rt, result, events = ran
    assert result.executed == ["7", "8"], "the nodes upstream of the lazy images link ran only as cells"
    ref = result.outputs["7"]["images"][0]
    folder = rt.folders.output_dir / ref["subfolder"]
    records = [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    runs = [nid for r in records for nid in r["executed"]]
    assert runs.count("1") == 1 and runs.count("2") == 1 and runs.count("3") == 1, "base and LoRAs load once"
    assert runs.count("5") == 4
    executing = [e["node"] for e in events if e["event"] == "executing"]
    assert executing == ["7", "8"], "the nested cell runs do not reach the run's listeners as its nodes"
    assert [e["value"] for e in events if e["event"] == "progress" and e["node"] == "7"] == [1, 2, 3, 4]


def test_a_second_run_takes_the_grid_from_the_cache(ran):
    rt, _, _ = ran
    again = rt.run(tiny_prompt())
    assert "7" in again.cached and "7" not in again.executed


@pytest.mark.parametrize("widget,text,says", [
    ("x_axis", "4.weight 0,1", "expected NODE_ID.INPUT=V1,V2"),
    ("y_axis", "4.weight_2=[0.5,", "axis 4.weight_2"),
    ("seeds", "[1, 2", "--seeds"),
])
def test_a_bad_axis_is_a_validation_error_naming_node_and_widget(widget, text, says):
    prompt = tiny_prompt()
    prompt["7"]["inputs"][widget] = text
    with pytest.raises(ValidationError) as caught:
        Runtime(demo_loras=True).validate(prompt)
    (problem,) = caught.value.node_errors["7"]["errors"]
    assert problem["extra_info"]["input_name"] == widget
    assert "SweepGrid" in problem["details"] and says in problem["details"]


def test_an_axis_outside_the_swept_image_is_named(tmp_path):
    prompt = tiny_prompt()
    prompt["7"]["inputs"]["y_axis"] = "8.filename_prefix=a,b"
    with pytest.raises(Exception) as caught:
        Runtime(output_dir=tmp_path, demo_loras=True).run(prompt)
    assert "node 8 does not feed this node's images" in str(caught.value)


@pytest.mark.parametrize("inputs,widget,says", [
    ({"x_axis": ""}, "y_axis", "y_axis given but x_axis is empty"),
])
def test_axes_come_in_order(inputs, widget, says):
    prompt = tiny_prompt()
    prompt["7"]["inputs"].update(inputs)
    with pytest.raises(ValidationError) as caught:
        Runtime(demo_loras=True).validate(prompt)
    (problem,) = caught.value.node_errors["7"]["errors"]
    assert problem["extra_info"]["input_name"] == widget and says in problem["details"]


def test_an_interrupt_stops_the_grid_and_keeps_finished_cells(tmp_path):
    from loraloom.graph_runtime import Interrupted

    rt = Runtime(output_dir=tmp_path, demo_loras=True)

    def stop_after_two_cells(event):
        if event["event"] == "progress" and event["node"] == "7" and event["value"] == 2:
            rt.interrupt()

    with pytest.raises(Interrupted):
        rt.run(tiny_prompt(), on_event=stop_after_two_cells)
    (folder,) = (tmp_path / "sweeps").iterdir()
    assert len((folder / MANIFEST).read_text().splitlines()) == 2, "the finished cells are kept"
    kept = {p.name: p.stat().st_ino for p in (folder / "cells").iterdir()}
    again = rt.run(tiny_prompt())
    assert again.outputs["7"]["images"][0]["subfolder"] == f"sweeps/{folder.name}"
    assert len((folder / MANIFEST).read_text().splitlines()) == 4
    assert {name: (folder / "cells" / name).stat().st_ino for name in kept} == kept, \
        "the finished cells were not written again (each write replaces the file)"
