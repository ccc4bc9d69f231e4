"""Sweeps on tiny-sdxl: the grid's cells are the plain workflow's images, loaded LoRAs and the base run
once, the model is re-patched only when its state changes, every cell is validated first, a failing cell
is recorded and the rest written, and a re-run resumes."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loraloom.api import DEMO_LORA_DIR, Runtime
from loraloom.graph_runtime import Interrupted
from loraloom.graph_runtime.workflow import apply_overrides
from loraloom.sweep.output import MANIFEST, SWEEP_TEXT
from loraloom.sweep.spec import SweepValidationError, build_spec, plan

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "blend_api.json"


def tiny_prompt() -> dict:
    """blend_api.json at the smallest size and two steps: the cells stay cheap."""
    prompt = json.loads(WORKFLOW.read_text())
    prompt["5"]["inputs"].update(steps=2, width=64, height=64)
    return prompt


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return Runtime(output_dir=tmp_path_factory.mktemp("out"), demo_loras=True)


@pytest.fixture(scope="module")
def grid(rt):
    """A 2x2 LoRA-weight grid over two seeds (8 cells), run once for the tests below."""
    return rt.sweep(tiny_prompt(), {"4.weight": [0.3, 0.9], "4.weight_2": [0.5, 1.0]}, seeds=[1, 2])


def test_each_node_runs_as_little_as_the_grid_needs(grid):
    assert not grid.failed and len(grid.ran) == 8
    runs = grid.executions()
    assert runs["1"] == 1 and runs["2"] == 1 and runs["3"] == 1, "the base and each LoRA load once"
    assert runs["4"] == 4, "one blend per weight pair"
    assert runs["5"] == 8, "one sample per cell"


def test_the_model_is_repatched_only_when_its_state_changes(grid):
    order = grid.plan.order
    assert len(order) == 8 and sorted(order) == list(range(8))
    records = [grid.records[i] for i in order]
    for before, record in zip([None, *records], records):
        changed = before is None or before.affinity != record.affinity
        assert (record.patched_layers > 0) == changed, (before, record)
    # cells that differ only in the seed share a model state and run next to each other
    assert len({r.affinity for r in records}) == 4
    assert sum(a.affinity != b.affinity for a, b in zip(records, records[1:])) == 3


def test_every_cell_is_the_plain_workflow_with_its_inputs_set(grid, tmp_path):
    plain = Runtime(output_dir=tmp_path, demo_loras=True)  # its own cache: nothing shared with the sweep
    for record in grid.records.values():
        prompt = apply_overrides(tiny_prompt(), record.overrides)
        saved = plain.run(prompt)
        ref = saved.outputs["6"]["images"][0]
        written = (tmp_path / ref["subfolder"] / ref["filename"]).read_bytes()
        (cell,) = record.files
        ours = (grid.out / cell["path"]).read_bytes()
        assert np.array_equal(np.asarray(Image.open(grid.out / cell["path"])),
                              np.asarray(Image.open(tmp_path / ref["subfolder"] / ref["filename"]))), record.index
        assert ours == written, "the same PNG, the cell's prompt embedded as SaveImage embeds it"


def test_the_grid_images_carry_labels_and_the_definition(grid):
    assert [p.name for p in grid.grids] == ["grid_z0.png", "grid_z1.png"], "one grid per seed"
    with Image.open(grid.grids[0]) as image:
        texts = dict(image.text)
        width, height = image.size
    assert width > 2 * 64 and height > 2 * 64, "two by two cells and their labels"
    definition = json.loads(texts[SWEEP_TEXT])
    assert definition["axes"] == grid.plan.spec.to_json()["axes"] and definition["z"] == [0]
    assert json.loads(texts["prompt"]) == grid.plan.prompt
    lines = (grid.out / MANIFEST).read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(8))


def test_zipped_axes_move_together_and_text_is_typed_by_the_schema(rt):
    prompt = tiny_prompt()
    spec = build_spec(prompt, rt.registry, ["5.steps=1,2", "5.scheduler=[\"default\"]"],
                      zip=[["4.weight=0,0.5", "4.weight_2=1,0.5"]])
    assert spec.shape == (2, 1, 2)
    assert spec.axes[0].values == ((1,), (2,)), "INT text read as int"
    zipped = spec.axes[2]
    assert zipped.values == ((0.0, 1.0), (0.5, 0.5)) and zipped.value_label(1) == "0.5, 0.5"
    planned = plan(rt, prompt, spec)
    assert [c.coords for c in planned.cells] == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)], "X fastest"
    assert planned.cells[3].overrides == {"5.steps": 2, "5.scheduler": "default", "4.weight": 0.5, "4.weight_2": 0.5}
    assert planned.cells[3].prompt["4"]["inputs"]["weight_2"] == 0.5


def test_the_run_order_changes_one_value_at_a_time(rt):
    planned = plan(rt, tiny_prompt(), build_spec(tiny_prompt(), rt.registry, ["4.weight=0,0.5,1", "4.weight_2=0,0.5,1"],
                                                   seeds=[1, 2]))
    cells = [planned.cells[i] for i in planned.order]
    for a, b in zip(cells, cells[1:]):
        weights = [k for k in ("4.weight", "4.weight_2") if a.overrides[k] != b.overrides[k]]
        assert len(weights) <= 1, f"one weight changes at a time: {a.overrides} -> {b.overrides}"
        assert (not weights) == (a.affinity == b.affinity), "cells of one model state run together"


def test_merge_cells_carry_their_report_and_seeds_are_the_samplers(rt):
    prompt = json.loads((WORKFLOW.parent / "merge_dare_api.json").read_text())
    prompt["7"]["inputs"].update(steps=2, width=64, height=64)
    result = rt.sweep(prompt, {"4.density": [0.3, 0.7]}, seeds=[1, 2])
    assert result.plan.spec.axes[1].targets == ("7.seed",), "the sampler's seed, not the DARE merge's"
    assert not result.failed and result.executions()["4"] == 2, "one merge per density, shared by both seeds"
    for record in result.records.values():
        assert record.reports["4"].startswith("merge dare_linear: "), "the exactness report, per cell"
    assert not (rt.folders.output_dir / "loras").exists(), "SaveLoRA is no image source: it did not run"


def test_every_cell_is_validated_before_anything_runs(rt):
    with pytest.raises(SweepValidationError) as caught:
        rt.sweep(tiny_prompt(), ["4.weight=0.5,abc,xyz"], out=rt.folders.output_dir / "bad")
    text = str(caught.value)
    assert "2 of 3 sweep cells failed validation" in text
    assert "cell 1 [1] (4.weight=abc)" in text and "cell 2 [2] (4.weight=xyz)" in text, text
    assert [c["index"] for c in caught.value.cells] == [1, 2]
    assert not (rt.folders.output_dir / "bad").exists(), "nothing ran, nothing was written"


def test_a_failing_cell_is_recorded_and_the_others_written_then_resumed(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    for name in ("x", "y", "z"):
        shutil.copy(DEMO_LORA_DIR / "demo-a.safetensors", loras / f"{name}.safetensors")
    rt = Runtime(lora_dirs=[loras], output_dir=tmp_path / "out", demo_loras=True)
    axes = {"2.lora_name": ["x.safetensors", "y.safetensors", "z.safetensors"]}

    def remove_y(record, done, total):
        if done == 1:
            (loras / "y.safetensors").rename(tmp_path / "y.safetensors")

    first = rt.sweep(tiny_prompt(), axes, on_cell=remove_y)
    assert first.failed == [1] and first.records[1].status == "failed"
    assert "y.safetensors" in json.dumps(first.records[1].error)
    assert first.records[0].ok and first.records[2].ok, "the sweep went on past the failed cell"
    assert len(list((first.out / "cells").iterdir())) == 2

    (tmp_path / "y.safetensors").rename(loras / "y.safetensors")
    again = rt.sweep(tiny_prompt(), axes)
    assert again.out == first.out and again.skipped == [0, 2] and again.ran == [1], "only the failed cell re-runs"
    assert not again.failed


def test_an_interrupted_sweep_keeps_its_finished_cells_and_resumes(tmp_path):
    rt = Runtime(output_dir=tmp_path, demo_loras=True)
    axes = {"4.weight": [0.1, 0.2, 0.3]}
    starts = []

    def interrupt_third(event):
        if event["event"] == "execution_start":
            starts.append(event)
        if event["event"] == "executing" and event["node"] == "5" and len(starts) == 3:
            rt.interrupt()

    with pytest.raises(Interrupted):
        rt.sweep(tiny_prompt(), axes, on_event=interrupt_third)
    (out,) = (tmp_path / "sweeps").iterdir()
    lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1], "the finished cells are kept"

    def interrupt_between_cells(record, done, total):
        rt.interrupt()  # after cell 2 finished, before the next starts: the next must not run

    with pytest.raises(Interrupted):
        rt.sweep(tiny_prompt(), {"4.weight": [0.1, 0.2, 0.3, 0.4]}, on_cell=interrupt_between_cells)
    (other,) = set((tmp_path / "sweeps").iterdir()) - {out}
    assert len((other / MANIFEST).read_text().splitlines()) == 1

    # a cell whose file no longer matches its recorded hash is not finished: it runs again
    (out / lines[0]["files"][0]["path"]).write_bytes(b"not the png")
    again = rt.sweep(tiny_prompt(), axes)
    assert again.skipped == [1] and sorted(again.ran) == [0, 2]
    runs = again.executions()
    assert runs["5"] == 1 and "1" not in runs, "cell 0 comes back from the warm cache: only cell 2 samples"
    assert not again.failed and len(again.grids) == 1


def test_the_command_line_sweeps_resumes_and_uses_runs_exit_codes(tmp_path, capsys):
    from loraloom.cli import main

    workflow = tmp_path / "tiny.json"
    workflow.write_text(json.dumps(tiny_prompt()))
    common = [str(workflow), "--lora-dir", str(DEMO_LORA_DIR), "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert main(["sweep", *common, "--axis", "4.weight=0,1", "--zip", "5.seed=1,2", "5.prompt=[\"a\", \"b\"]"]) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 cells (4 run, 0 finished before, 0 failed)" in printed and "grid.png" in printed, printed
    (folder,) = (tmp_path / "out" / "sweeps").iterdir()
    assert folder.name.startswith("tiny-") and len(list((folder / "cells").iterdir())) == 4
    assert main(["sweep", *common, "--axis", "4.weight=0,1", "--zip", "5.seed=1,2", "5.prompt=[\"a\", \"b\"]"]) == 0
    assert "(0 run, 4 finished before, 0 failed)" in capsys.readouterr().out, "the second run resumes"

    assert main(["sweep", *common, "--axis", "4.weight=abc,0,x"]) == 1, "invalid cells: run's validation code"
    err = capsys.readouterr().err
    assert "cell 0 [0] (4.weight=abc)" in err and "cell 2 [2] (4.weight=x)" in err, err
    assert main(["sweep", *common, "--axis", "9.weight=1"]) == 2, "an axis of a node the workflow lacks: usage"
    assert "no node 9" in capsys.readouterr().err


def test_the_readme_lists_every_manifest_field():
    from loraloom.sweep.output import MANIFEST_FIELDS, CellRecord
    from dataclasses import fields

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = re.findall(r"^\| `(\w+)` \|", readme.split("## Sweeps", 1)[1].split("\n## ", 1)[0], re.M)
    assert listed == list(MANIFEST_FIELDS) == [f.name for f in fields(CellRecord)]
