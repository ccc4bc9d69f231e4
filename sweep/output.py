"""A sweep's files, written only by the driver and each atomically (whole or absent):

- ``sweep.json``: the definition (axes, the workflow's prompt and editor graph, its digest, the shape);
- ``cells/cell0003_node6_0.png``: each cell's image (cell 3, image output node 6, batch image 0), with
  the cell's prompt and the workflow embedded as SaveImage embeds them: the same bytes a plain run of
  the workflow with the cell's inputs set saves;
- ``manifest.jsonl``: one line per finished or failed cell (fields: `MANIFEST_FIELDS`), rewritten
  whole after every cell, in cell order;
- ``grid.png`` (``grid_z1_0.png`` per combination of Z positions when there are more than two axes):
  the cells' images in a labelled grid, the sweep definition embedded (tEXt ``loraloom_sweep``) beside
  the workflow.

A cell counts as finished when its manifest line says so and every file it lists is there with the
sha256 recorded; resuming a sweep skips exactly those.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..nodes.image import encode_png, workflow_texts
from .cell import Cell, CellResult
from .spec import SweepPlan

SWEEP_TEXT = "loraloom_sweep"
MANIFEST = "manifest.jsonl"
DEFINITION = "sweep.json"
CELLS = "cells"
MANIFEST_FIELDS = {
    "index": "the cell's number, row-major (X fastest, then Y, then Z)",
    "coords": "the position on each axis",
    "overrides": "NODE_ID.INPUT -> the value this cell sets",
    "status": "'ok' or 'failed'",
    "files": "the cell's images: path (relative to the sweep folder), node, batch, sha256",
    "seconds": "wall time of the cell",
    "executed": "the node ids this cell ran",
    "cached": "the node ids this cell took from the cache",
    "timings": "node id -> seconds, for the nodes it ran",
    "patched_layers": "layers the model pool re-patched for this cell",
    "loads": "base models the pool loaded for this cell",
    "compiles": "denoisers the pool compiled for this cell",
    "reports": "node id -> report text (a PeftMerge's exactness report)",
    "error": "the failure as JSON (None when it ran)",
    "worker": "who ran it ('local', or a Ray actor)",
    "affinity": "equal for cells that share one model state",
}
LABEL_PX = 14  # text size on the grid
PAD = 6


@dataclass
class CellRecord:
    """A cell's manifest line (see `MANIFEST_FIELDS`)."""

    index: int
    coords: list
    overrides: dict
    status: str
    files: list = field(default_factory=list)
    seconds: float = 0.0
    executed: list = field(default_factory=list)
    cached: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    patched_layers: int = 0
    loads: int = 0
    compiles: int = 0
    reports: dict = field(default_factory=dict)
    error: dict | None = None
    worker: str = "local"
    affinity: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _line(record: CellRecord) -> str:
    return json.dumps(asdict(record), default=str)


def cell_file(index: int, node: str, batch: int) -> str:
    """A cell image's path in the sweep folder."""
    return f"{CELLS}/cell{index:04d}_node{node}_{batch}.png"


class SweepFolder:
    """The folder of one sweep: reads what an earlier run of it left, writes cells, manifest and grids."""

    def __init__(self, root: Path, plan: SweepPlan):
        self.root = Path(root)
        self.plan = plan
        self.records: dict[int, CellRecord] = {}
        self._lines: dict[int, str] = {}  # each record's manifest line, serialised once

    def definition(self) -> dict:
        return {"version": 1, "source": self.plan.source, "digest": self.plan.digest, "shape": list(self.plan.spec.shape),
                **self.plan.spec.to_json(), "prompt": self.plan.prompt, "workflow": self.plan.ui}

    def start(self, resume: bool) -> set[int]:
        """Write ``sweep.json``; with ``resume``, keep the records of the cells an earlier run of the same
        sweep finished whose files are intact, and return their indices (the rest run again)."""
        self.records = self._intact() if resume else {}
        self._lines = {i: _line(record) for i, record in self.records.items()}
        atomic_write_bytes(self.root / DEFINITION, json.dumps(self.definition(), indent=1, default=str).encode())
        self._write_manifest()
        return set(self.records)

    def _intact(self) -> dict[int, CellRecord]:
        try:
            old = json.loads((self.root / DEFINITION).read_text())
            lines = (self.root / MANIFEST).read_text().splitlines()
        except (OSError, ValueError):
            return {}
        if old.get("digest") != self.plan.digest:
            return {}
        kept = {}
        for line in lines:
            try:
                record = CellRecord(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a line of another version: that cell runs again
            if record.ok and 0 <= record.index < len(self.plan.cells) and all(self._intact_file(f) for f in record.files):
                kept[record.index] = record
        return kept

    def _intact_file(self, entry: dict) -> bool:
        try:
            return _sha256((self.root / entry["path"]).read_bytes()) == entry["sha256"]
        except (OSError, KeyError, TypeError):
            return False

    def write_cell(self, cell: Cell, result: CellResult) -> CellRecord:
        """Write a cell's images (prompt + workflow embedded) and its manifest line."""
        files = []
        texts = workflow_texts(cell.prompt, self.plan.ui)
        for node in sorted(result.images):
            for batch, array in enumerate(result.images[node]):
                data = encode_png(array, texts)
                path = cell_file(cell.index, node, batch)
                atomic_write_bytes(self.root / path, data)
                files.append({"path": path, "node": node, "batch": batch, "sha256": _sha256(data)})
        record = CellRecord(cell.index, list(cell.coords), cell.overrides, "ok" if result.ok else "failed", files,
                            round(result.seconds, 4), result.executed, result.cached,
                            {k: round(v, 4) for k, v in result.timings.items()}, result.patched_layers, result.loads,
                            result.compiles, result.reports, result.error, result.worker, cell.affinity)
        self.records[cell.index] = record
        self._lines[cell.index] = _line(record)
        self._write_manifest()
        return record

    def _write_manifest(self) -> None:
        # the whole file each time (atomic: a reader never sees half a line), from lines serialised once
        atomic_write_bytes(self.root / MANIFEST, "".join(self._lines[i] + "\n" for i in sorted(self._lines)).encode())

    def write_grids(self) -> list[Path]:
        """One labelled grid per combination of Z positions (one in all for one or two axes)."""
        spec = self.plan.spec
        shape = spec.shape
        nx_, ny = shape[0], (shape[1] if len(shape) > 1 else 1)
        per_grid = nx_ * ny
        grids = []
        for start in range(0, len(self.plan.cells), per_grid):
            cells = self.plan.cells[start:start + per_grid]
            z = cells[0].coords[2:]
            name = "grid.png" if not z else "grid_z" + "_".join(str(p) for p in z) + ".png"
            image = self._grid_image(cells, nx_, ny, z)
            texts = {SWEEP_TEXT: json.dumps({**spec.to_json(), "digest": self.plan.digest, "z": list(z),
                                             "source": self.plan.source}),
                     **workflow_texts(self.plan.prompt, self.plan.ui)}
            atomic_write_bytes(self.root / name, encode_png(image, texts))
            grids.append(self.root / name)
        return grids

    def _first_image(self, index: int):
        from PIL import Image

        record = self.records.get(index)
        if record is None or not record.ok or not record.files:
            return None
        with Image.open(self.root / record.files[0]["path"]) as img:
            return img.convert("RGB")

    def _grid_image(self, cells: list[Cell], nx_: int, ny: int, z: tuple):
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.load_default(size=LABEL_PX)
        spec = self.plan.spec
        images = {cell.index: self._first_image(cell.index) for cell in cells}
        cw = max([im.width for im in images.values() if im is not None] or [64])
        ch = max([im.height for im in images.values() if im is not None] or [64])
        line = LABEL_PX + PAD
        title = [f"X: {spec.axes[0].label}"] + ([f"Y: {spec.axes[1].label}"] if len(spec.axes) > 1 else [])
        title += [f"Z: {axis.label} = {axis.value_label(p)}" for axis, p in zip(spec.axes[2:], z)]
        y_labels = [spec.axes[1].value_label(j) for j in range(ny)] if len(spec.axes) > 1 else [""]
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left = max(probe.textlength(t, font=font) for t in y_labels) + 2 * PAD if len(spec.axes) > 1 else 0
        top = line * (len(title) + 1) + PAD
        grid = Image.new("RGB", (int(left) + nx_ * (cw + PAD) + PAD, top + ny * (ch + PAD) + PAD), "white")
        draw = ImageDraw.Draw(grid)
        for k, text in enumerate(title):
            draw.text((PAD, PAD + k * line), text, fill="black", font=font)
        for i in range(nx_):
            draw.text((left + PAD + i * (cw + PAD), top - line), spec.axes[0].value_label(i), fill="black", font=font)
        for j, text in enumerate(y_labels):
            draw.text((PAD, top + j * (ch + PAD) + ch // 2), text, fill="black", font=font)
        for cell in cells:
            i, j = cell.coords[0], (cell.coords[1] if len(cell.coords) > 1 else 0)
            x0, y0 = int(left) + PAD + i * (cw + PAD), top + j * (ch + PAD)
            image = images[cell.index]
            if image is None:  # failed or not run: a grey tile saying so
                draw.rectangle((x0, y0, x0 + cw - 1, y0 + ch - 1), fill=(200, 200, 200))
                draw.text((x0 + PAD, y0 + PAD), "failed" if cell.index in self.records else "not run", fill="black",
                          font=font)
            else:
                grid.paste(image, (x0 + (cw - image.width) // 2, y0 + (ch - image.height) // 2))
        return grid

