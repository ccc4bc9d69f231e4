"""SweepGrid inside ComfyUI. ComfyUI's executor cannot run a nested prompt, but a node may expand into
a graph: SweepGrid there takes its ``images`` link raw and unevaluated (ComfyUI's ``lazy`` and
``rawLink`` input options, with no ``check_lazy_status``: the image is never rendered plainly) and the
prompt (a hidden input), and expands into one copy of the nodes upstream of the image per cell, each
with its cell's values set, plus a `SweepGridCells` node that takes every cell's image and draws the
grid with the sweep's own drawing (:mod:`.output`) into the same kind of folder. ComfyUI's cache keys
a node by its class, inputs and ancestors, not its id, so the copies of a node that no axis changes
(LoadBase, LoadLoRA) run once.

What differs from our runtime: the ``seeds`` axis sets LoRA Loom's samplers' seeds (an axis names
another sampler's seed), and a cell that fails fails the prompt (ComfyUI runs one graph). Axes may set
inputs of any node, ComfyUI's own included: a value for a node that is not ours is typed as its
``INPUT_TYPES`` declares the input.
"""

from __future__ import annotations

import copy
import json

from ..comfy_integration import comfy_input_types
from ..graph_runtime import Input, Output, String, current_context, is_link, node
from ..graph_runtime.schema import comfy_classes, comfy_display_names
from ..graph_runtime.workflow import apply_overrides
from ..nodes import registry
from ..nodes.common import CATEGORY, IMAGE, output_ref
from ..nodes.sweep_grid import SweepGrid, axes_of, cell_workflow, stack_grids
from .cell import Cell, CellResult, image_sources, to_uint8
from .driver import default_out
from .output import SweepFolder
from .spec import Axis, SweepPlan, SweepSpec, build_spec, typed

CELL_INPUT = "cell_{}"


class ComfySweepGrid(SweepGrid):
    """SweepGrid as ComfyUI runs it: it expands into the cells and a `SweepGridCells` node. The same
    class serves ComfyUI's V1 and V3 node APIs (comfy_v3 makes its V3 form)."""

    COMFY_HIDDEN = {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}
    INPUT_TYPES = classmethod(comfy_input_types)  # the lazy `images` arrives as its link (rawLink)

    def execute(self, images, x_axis, y_axis, z_axis, seeds, prompt=None, unique_id=None):
        uid = str(unique_id)
        cells = cell_workflow(prompt, uid, images)
        spec = build_spec(cells, registry(), axes_of(cells, x_axis, y_axis, z_axis), seeds=seeds.strip() or None)
        spec = comfy_typed(spec, cells)
        source, slot = cells[uid]["inputs"]["images"]
        graph, links = {}, {}
        for index, coords in enumerate(spec.coords()):
            prefix = f"{uid}.{index}."  # unique per cell and deterministic, as ComfyUI asks of expanded ids
            cell = apply_overrides(copy.deepcopy(cells), spec.overrides(coords))
            for nid, entry in cell.items():
                if nid != uid:
                    graph[prefix + nid] = {"class_type": entry["class_type"], "inputs": {
                        k: [prefix + str(v[0]), v[1]] if is_link(v) else v for k, v in entry["inputs"].items()}}
            links[CELL_INPUT.format(index)] = [prefix + source, slot]
        definition = json.dumps({"spec": spec.to_json(), "prompt": cells}, default=str)
        graph[f"{uid}.grid"] = {"class_type": SweepGridCells.SCHEMA.id, "inputs": {"definition": definition, **links}}
        return {"expand": graph, "result": ([f"{uid}.grid", 0],)}


def _comfy_input(cells: dict, target: str) -> Input | None:
    """The input ``target`` names on a node that is not LoRA Loom's, as its class's ``INPUT_TYPES`` (in
    ComfyUI's ``nodes.NODE_CLASS_MAPPINGS``) declares it; None for ours (`build_spec` typed them) or
    when it is not declared as a widget."""
    import nodes as comfy_nodes  # ComfyUI's own module: this runs inside ComfyUI only

    node_id, _, name = target.partition(".")
    class_type = cells[node_id]["class_type"]
    cls = comfy_nodes.NODE_CLASS_MAPPINGS.get(class_type)
    if class_type in registry() or cls is None:
        return None
    declared = cls.INPUT_TYPES()
    spec = declared.get("required", {}).get(name) or declared.get("optional", {}).get(name)
    if not spec:
        return None
    if isinstance(spec[0], (list, tuple)):
        return Input(name, "COMBO", options=tuple(spec[0]))
    return Input(name, spec[0]) if spec[0] in ("INT", "FLOAT", "BOOLEAN", "STRING") else None


def comfy_typed(spec: SweepSpec, cells: dict) -> SweepSpec:
    """``spec`` with the values of inputs of nodes that are not ours typed as ComfyUI declares them."""
    axes = []
    for axis in spec.axes:
        inputs = [_comfy_input(cells, target) for target in axis.targets]
        values = tuple(tuple(typed(inp, v) for inp, v in zip(inputs, position)) for position in axis.values)
        axes.append(Axis(axis.targets, values, axis.name))
    return SweepSpec(tuple(axes))


@node(id="LoraLoomSweepGridCells", aliases=("SweepGridCells",), category=f"{CATEGORY}/sweep",
      display_name="Loom Sweep Grid cells (inside ComfyUI)",
      inputs=[String("definition", multiline=True, tooltip="the sweep (axes and the cells' workflow) as JSON")],
      outputs=[Output(IMAGE, "grid")])
class SweepGridCells:
    """Inside ComfyUI, the node a SweepGrid expands into to draw its grid: it takes every cell's image
    (inputs ``cell_0``, ``cell_1``, ...), writes the cells, manifest and labelled grid as a sweep does,
    and outputs the grid. Not for placing by hand."""

    def execute(self, definition, **cells):
        data = json.loads(definition)
        spec, prompt = SweepSpec.from_json(data["spec"]), data["prompt"]
        sources = image_sources(prompt)
        planned = [Cell(i, coords, spec.overrides(coords), apply_overrides(copy.deepcopy(prompt), spec.overrides(coords)),
                        sources) for i, coords in enumerate(spec.coords())]
        plan = SweepPlan(spec, prompt, None, "workflow", planned, list(range(len(planned))))
        folder = SweepFolder(default_out(current_context(), plan), plan)
        folder.start(resume=False)
        (shown,) = sources
        for cell in planned:
            folder.write_cell(cell, CellResult(cell.index, images={shown: to_uint8(cells[CELL_INPUT.format(cell.index)])},
                                               worker="comfyui"))
        grids = folder.write_grids()
        return {"ui": {"images": [output_ref(path) for path in grids]}, "result": (stack_grids(grids),)}


def comfy_nodes() -> tuple[dict, dict]:
    """The classes ComfyUI takes for SweepGrid and its cells node (old ids as deprecated classes), and
    their display names."""
    classes = {**comfy_classes(ComfySweepGrid), **comfy_classes(SweepGridCells)}
    return classes, comfy_display_names(classes)
