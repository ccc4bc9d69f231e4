"""SweepGrid: a sweep from the editor. Its widgets declare the axes (``NODE_ID.INPUT=V1,V2``, the node
ids the editor shows), its ``images`` input names the image the grid is made of, and its output is the
labelled grid.

The ``images`` link is lazy: the runtime does not render it once plainly. The node runs the part of the
workflow upstream of it once per cell, as a nested prompt on the same runtime (same cache and model pool:
a LoRA loads once, cells that differ downstream of the model re-patch nothing), through the runtime's
sweep, so the cells, grid and manifest are those ``loraloom sweep`` writes for the same axes, in
``<output>/sweeps/``.
"""

from __future__ import annotations

import copy

from ..graph_runtime import (InputError, Link, LoomError, Output, String, current_context, is_link, node,
                             parse_axis, parse_seeds)
from .common import CATEGORY, IMAGE, output_ref

AXES = ("x_axis", "y_axis", "z_axis")
_AXIS_TIP = ("NODE_ID.INPUT=V1,V2,... (the node ids the editor shows, e.g. 4.weight=0,0.5,1; =[JSON list] "
             "for values with commas); several lines move together (one zipped axis); empty: no axis")


def axis_lines(text: str) -> list[str]:
    """An axis widget's targets, one ``NODE_ID.INPUT=...`` per non-empty line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def upstream_of(prompt: dict, node_id: str) -> set[str]:
    """``node_id`` and every node of an API prompt it depends on through its links."""
    seen, stack = set(), [str(node_id)]
    while stack:
        nid = stack.pop()
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        stack.extend(str(v[0]) for v in prompt[nid].get("inputs", {}).values() if is_link(v))
    return seen


def cell_workflow(prompt: dict, node_id: str, images) -> dict:
    """The workflow each cell runs: the nodes of ``prompt`` that feed the SweepGrid ``node_id``'s
    ``images`` link, and a PreviewImage in the SweepGrid's place (its id names the cells' files) showing
    that image, so a sweep takes it as each cell's image."""
    source, slot = str(images[0]), int(images[1])
    cells = {nid: copy.deepcopy(prompt[nid]) for nid in upstream_of(prompt, source)}
    cells[str(node_id)] = {"class_type": "PreviewImage", "inputs": {"images": [source, slot]}}
    return cells


def axes_of(cells: dict, *texts: str) -> list[list[str]]:
    """The axes the widgets give (each a list of ``NODE_ID.INPUT=...`` lines, zipped when several), each
    target checked to be a node of the cell workflow ``cells``: one that does not feed the image is an
    error naming the widget."""
    axes = []
    for name, text in zip(AXES, texts):
        lines = axis_lines(text)
        for line in lines:
            target = parse_axis(line)[0]
            node_id = target.partition(".")[0]
            if node_id not in cells or cells[node_id]["class_type"] == "PreviewImage":
                feeding = ", ".join(sorted(nid for nid, n in cells.items() if n["class_type"] != "PreviewImage"))
                raise InputError(f"{name} {target}: node {node_id} does not feed this node's images (nodes that "
                                 f"do: {feeding})", input=name, value=target, kind="axis_not_upstream",
                                 fix="sweep an input of a node upstream of images")
        if lines:
            axes.append(lines)
    return axes


def stack_grids(paths: list):
    """The grid PNGs as one IMAGE batch (float, 0..1), each padded with white to the largest size."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as img:
            arrays.append(np.asarray(img.convert("RGB")))
    height, width = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    batch = np.full((len(arrays), height, width, 3), 255, dtype=np.uint8)
    for i, a in enumerate(arrays):
        batch[i, :a.shape[0], :a.shape[1]] = a
    return torch.from_numpy(batch.astype(np.float32) / 255.0)


@node(id="LoraLoomSweepGrid", aliases=("SweepGrid",), category=f"{CATEGORY}/sweep", display_name="Loom Sweep Grid",
      output_node=True,
      inputs=[Link("images", IMAGE, lazy=True, tooltip="the image each cell renders: the nodes upstream of it "
                   "run once per cell, with that cell's values set"),
              String("x_axis", "", multiline=True, tooltip="the grid's columns: " + _AXIS_TIP),
              String("y_axis", "", multiline=True, tooltip="the grid's rows: " + _AXIS_TIP),
              String("z_axis", "", multiline=True, tooltip="one grid per value: " + _AXIS_TIP),
              String("seeds", "", tooltip="1,2,3: one more axis setting the seed of every sampler upstream "
                     "(after the others)")],
      outputs=[Output(IMAGE, "grid", tooltip="the labelled grid (one per Z value)")])
class SweepGrid:
    """Render the image linked to `images` over axes of input values and output the labelled grid; the
    cells, grid and manifest are written as `loraloom sweep` writes them (`<output>/sweeps/`)."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        problems = {}
        given = {}
        for name in AXES:
            text = constants.get(name)
            if not isinstance(text, str):
                continue
            given[name] = bool(axis_lines(text))
            for line in axis_lines(text):
                try:
                    parse_axis(line)
                except LoomError as exc:
                    problems[name] = InputError(f"{exc}", value=line, kind="bad_axis",
                                                fix="write NODE_ID.INPUT=V1,V2, e.g. 4.weight=0,0.5,1")
                    break
        seeds = constants.get("seeds")
        # (no axis at all is said when the node runs: the defaults, all empty, must pass a queue check)
        if isinstance(seeds, str) and seeds.strip():
            try:
                parse_seeds(seeds)
            except LoomError as exc:
                problems["seeds"] = InputError(f"{exc}", value=seeds, kind="bad_axis")
        for earlier, later in zip(AXES, AXES[1:]):
            if given.get(later) and given.get(earlier) is False:
                problems.setdefault(later, InputError(f"{later} given but {earlier} is empty", kind="axis_gap",
                                                      fix=f"move it to {earlier}"))
        return problems

    def execute(self, images, x_axis, y_axis, z_axis, seeds):
        ctx = current_context()
        runtime = ctx.runtime
        if runtime is None or not hasattr(runtime, "sweep") or ctx.prompt is None:
            raise LoomError("SweepGrid runs in LoRA Loom's runtime (loraloom run / serve, Runtime) or in ComfyUI",
                            kind="sweep_grid_runtime")
        prompt = cell_workflow(ctx.prompt, ctx.node_id, images)
        axes = axes_of(prompt, x_axis, y_axis, z_axis)
        result = runtime.sweep(prompt, axes, seeds=seeds.strip() or None,
                               on_cell=lambda record, done, total: ctx.progress(done, total))
        ok = len(result.records) - len(result.failed)
        if not ok:
            first = result.records[result.failed[0]].error or {}
            raise LoomError(f"every cell of the sweep failed; cell {result.failed[0]}: {first.get('message', first)}",
                            kind="sweep_failed", fix=f"see {result.out}/manifest.jsonl")
        text = [f"{' x '.join(map(str, result.plan.spec.shape))} grid: {ok} of {len(result.records)} cells "
                f"in {result.out}"]
        text += [f"cell {i} failed: {(result.records[i].error or {}).get('message', '')}" for i in result.failed]
        return {"ui": {"images": [output_ref(path) for path in result.grids], "text": text},
                "result": (stack_grids(result.grids),)}
