"""The sweep driver: plans nothing and computes nothing itself; it hands the cells still to do to an
executor, in the planned order, and writes every result as it comes back (:mod:`.output`).

A failing cell is written as failed and the sweep goes on; an interrupt stops it with every finished
cell and the manifest written; running the same sweep again skips the finished cells.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..graph_runtime import InputError, Runtime
from .executor import Executor, LocalExecutor, SweepJob
from .output import CellRecord, SweepFolder
from .spec import SweepPlan

EXECUTORS = ("local", "ray")


@dataclass
class SweepResult:
    """What a sweep left: its folder ``out``, the ``plan``, every cell's manifest record (``records``, by
    index), the ``grids`` written, the cells that ``ran`` now and those ``skipped`` (finished before)."""

    out: Path
    plan: SweepPlan
    records: dict[int, CellRecord]
    grids: list[Path] = field(default_factory=list)
    ran: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    @property
    def failed(self) -> list[int]:
        return sorted(i for i, r in self.records.items() if not r.ok)

    def executions(self) -> Counter:
        """How many times each node ran, over the cells run now (node id -> count)."""
        return Counter(nid for i in self.ran for nid in self.records[i].executed)

    @property
    def patched_layers(self) -> int:
        """Layers the model pool re-patched over the cells run now."""
        return sum(self.records[i].patched_layers for i in self.ran)


def default_out(runtime: Runtime, plan: SweepPlan) -> Path:
    """``<output>/sweeps/<workflow stem>-<definition hash>``: the same sweep lands in the same folder,
    which is what lets a second run resume it."""
    source = Path(plan.source or "")
    # a file's name; a workflow that came as data (a dict, a queued prompt) has none
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", source.stem) if source.suffix.lower() in (".json", ".png") else "workflow"
    return runtime.folders.output_dir / "sweeps" / f"{stem}-{plan.digest[:10]}"


def make_executor(name: str, runtime: Runtime, address: str | None = None, on_event=None) -> Executor:
    """The executor called ``name``: "local" (this runtime) or "ray" (a Ray cluster at ``address``,
    None: start or join a local one; needs ``pip install 'loraloom[ray]'``)."""
    if name == "local":
        return LocalExecutor(runtime, on_event=on_event)
    if name == "ray":
        from .ray_executor import RayExecutor  # optional: imports ray

        return RayExecutor(address=address, interrupt_flag=runtime.interrupt_flag)  # Ctrl-C reaches the workers
    raise InputError(f"executor {name!r} is not one of {', '.join(EXECUTORS)}.", input="executor", value=name,
                     limit=list(EXECUTORS), kind="bad_executor")


def run_sweep(runtime: Runtime, plan: SweepPlan, out: Path | None = None, *, executor: Executor | None = None,
              job: SweepJob | None = None, resume: bool = True,
              on_cell: Callable[[CellRecord, int, int], None] | None = None) -> SweepResult:
    """Run the cells of ``plan`` not finished in ``out`` (default `default_out`) on ``executor`` (default:
    this runtime), writing each as it comes back; then the grids. ``on_cell(record, done, total)`` after
    each cell. An interrupt (``Interrupted``) propagates after the finished cells are written."""
    out = Path(out) if out is not None else default_out(runtime, plan)
    folder = SweepFolder(out, plan)
    skipped = folder.start(resume)
    executor = executor or LocalExecutor(runtime)
    job = job or SweepJob.from_runtime(runtime)
    todo = [cell for cell in plan.ordered() if cell.index not in skipped]
    result = SweepResult(out, plan, folder.records, skipped=sorted(skipped))
    by_index = {cell.index: cell for cell in todo}
    done = len(skipped)
    try:
        for cell_result in executor.run(todo, job):
            record = folder.write_cell(by_index[cell_result.index], cell_result)
            result.ran.append(record.index)
            done += 1
            if on_cell is not None:
                on_cell(record, done, len(plan.cells))
    finally:
        executor.close()
    result.grids = folder.write_grids()
    return result
