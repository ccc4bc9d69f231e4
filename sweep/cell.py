"""One cell of a sweep: the workflow with that cell's inputs set, and what running it gave.

`run_cell` is what every executor calls, in the driver's process (local) or in a worker (Ray): it
runs the cell on a runtime and returns a `CellResult` of plain data (images as uint8 arrays, the
merge reports as text, counts), which pickles cheaply and writes no file: the driver writes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..graph_runtime import LoomError
from ..graph_runtime.workflow import is_link
from ..nodes.image import image_uint8

# The output nodes whose input image a sweep takes as the cell's image (ComfyUI's and our stand-ins).
IMAGE_OUTPUTS = {"SaveImage": "images", "PreviewImage": "images"}
# Nodes whose UI output (their report) the manifest keeps for each cell (ids: compare a prompt's
# class_type through the registry, which resolves an older id to its node's).
REPORT_NODES = {"LoraLoomPeftMerge"}


@dataclass(frozen=True)
class Cell:
    """One cell: ``index`` in the sweep's row-major order of axes, ``coords`` the index of each axis's
    value, ``overrides`` ("NODE.INPUT" -> value) and ``prompt`` the API prompt with them set;
    ``sources`` the image output node ids -> the (node, slot) that feeds their image; ``reports`` the
    nodes whose report the cell returns; ``affinity`` equal for cells that need the same model state
    (same base, LoRAs and merges), so an executor sends them where that state is warm."""

    index: int
    coords: tuple[int, ...]
    overrides: dict[str, Any]
    prompt: dict
    sources: dict[str, tuple[str, int]]
    reports: tuple[str, ...] = ()
    affinity: str = ""


@dataclass
class CellResult:
    """What running one cell gave, as plain data. ``images``: image output node id -> its batch as
    uint8 [H, W, C] arrays (what SaveImage would write); ``reports``: node id -> report text;
    ``error``: the failure as JSON (``LoomError.to_json()``), None when it ran; ``patched_layers``,
    ``loads``, ``compiles``: what the model pool did for this cell; ``worker``: who ran it."""

    index: int
    images: dict[str, list] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)
    error: dict | None = None
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    patched_layers: int = 0
    loads: int = 0
    compiles: int = 0
    worker: str = "local"

    @property
    def ok(self) -> bool:
        return self.error is None


def image_sources(prompt: dict) -> dict[str, tuple[str, int]]:
    """The image output nodes of an API prompt -> the (node id, slot) linked to their image input."""
    out = {}
    for nid, node in prompt.items():
        name = IMAGE_OUTPUTS.get(node.get("class_type"))
        value = node.get("inputs", {}).get(name) if name else None
        if value is not None and is_link(value):
            out[str(nid)] = (str(value[0]), int(value[1]))
    return out


def to_uint8(images) -> list:
    """A ComfyUI IMAGE batch (float [B, H, W, C] in 0..1) as uint8 arrays, rounded as our SaveImage
    rounds, so a cell's PNG has the pixels the plain workflow's SaveImage writes."""
    return [image_uint8(image) for image in images]


def _pool_stats(runtime) -> dict:
    pool = runtime.resources.get("model_pool")
    return dict(pool.stats) if pool is not None else {}


def run_cell(runtime, cell: Cell, worker: str = "local", on_event=None) -> CellResult:
    """Run ``cell`` on ``runtime`` (a Runtime with LoRA Loom's nodes), computing only the image
    sources and report nodes (image output nodes do not run: no file is written). A failure is
    returned in the result, not raised, except an interrupt (``Interrupted``), which is raised."""
    from ..graph_runtime import Interrupted

    before = _pool_stats(runtime)
    result = CellResult(cell.index, worker=worker)
    targets = sorted({nid for nid, _ in cell.sources.values()} | set(cell.reports))
    start = time.perf_counter()
    try:
        run = runtime.run(cell.prompt, outputs=targets, on_event=on_event)
    except Interrupted:
        raise
    except LoomError as exc:
        result.error = exc.to_json()
    else:
        result.images = {out: to_uint8(run.value(nid, slot)) for out, (nid, slot) in cell.sources.items()}
        result.reports = {nid: "\n".join(run.outputs[nid]["text"]) for nid in cell.reports
                          if "text" in run.outputs.get(nid, {})}
        result.executed, result.cached, result.timings = run.executed, run.cached, run.timings
    result.seconds = time.perf_counter() - start
    after = _pool_stats(runtime)
    for name, stat in (("patched_layers", "patched_layers"), ("loads", "loads"), ("compiles", "compiles")):
        setattr(result, name, after.get(stat, 0) - before.get(stat, 0))
    return result
