"""Where a sweep's cells run: the `Executor` protocol, what a worker needs to build its runtime
(`SweepJob`), and `LocalExecutor`, which runs them on one runtime in this process.

An executor only computes: it yields each cell's `CellResult` (plain data) as it finishes, and the
driver (:mod:`.output`) writes every file. So a local run and a run on remote workers write the same
files, in one place, atomically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

from ..graph_runtime import Folders, Interrupted, Limits, Runtime
from ..nodes import load_node_modules, registry
from .cell import Cell, CellResult, run_cell


@dataclass(frozen=True)
class SweepJob:
    """What a worker needs to build a runtime equivalent to the driver's: its ``folders`` (the demo
    LoRA folder, when the driver's runtime has it, is among ``folders.lora_dirs``), ``limits``, the
    ``node_modules`` that register extra nodes, the byte budgets of the memory and disk caches and
    ``strict_files``. Plain data: it pickles, so it travels to another process or machine."""

    folders: Folders
    limits: Limits
    node_modules: tuple[str, ...] = ()
    cache_bytes: int | None = None
    disk_cache_dir: str | None = None
    disk_cache_bytes: int | None = None
    strict_files: bool = False

    @classmethod
    def from_runtime(cls, runtime: Runtime, node_modules: Iterable[str] = ()) -> "SweepJob":
        """The job that rebuilds ``runtime`` elsewhere (its folders, limits, cache budgets, file mode)."""
        return cls(folders=runtime.folders, limits=runtime.limits, node_modules=tuple(node_modules),
                   cache_bytes=runtime.cache.max_bytes, disk_cache_dir=str(runtime.disk_cache.root),
                   disk_cache_bytes=runtime.disk_cache.max_bytes, strict_files=runtime.strict_files)

    def with_folders(self, folders: Folders) -> "SweepJob":
        """This job with other folders (a worker whose files live elsewhere)."""
        return dataclasses.replace(self, folders=folders)

    def build_runtime(self) -> Runtime:
        """A runtime with LoRA Loom's nodes (and those of ``node_modules``) configured as the job says."""
        load_node_modules(list(self.node_modules))
        extra = {} if self.cache_bytes is None else {"cache_bytes": self.cache_bytes}
        return Runtime(registry=registry(), folders=self.folders, limits=self.limits, strict_files=self.strict_files,
                       disk_cache_dir=self.disk_cache_dir, disk_cache_bytes=self.disk_cache_bytes, **extra)


class Executor(Protocol):
    """Runs a sweep's cells. ``run(cells, job)`` yields one `CellResult` per cell, each as soon as it is
    done, in any order (``CellResult.index`` says which cell); a cell that fails is a result with its
    ``error``, not an exception. An interrupt (``Interrupted``) or an executor that cannot go on raises,
    after the results already yielded. ``cells`` come in the order the planner chose for reuse: run
    them in that order where one worker runs them. ``close()`` frees workers; the executor is not
    used after it."""

    def run(self, cells: list[Cell], job: SweepJob) -> Iterator[CellResult]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs cells one after another on one runtime in this process: ``runtime`` (the caller's, warm
    cache and model pool included), else one built from the job on the first run. ``on_event`` gets
    the runtime's events of every cell (progress of the node and its steps)."""

    name = "local"

    def __init__(self, runtime: Runtime | None = None, on_event=None):
        self.runtime = runtime
        self.on_event = on_event

    def run(self, cells: list[Cell], job: SweepJob) -> Iterator[CellResult]:
        if self.runtime is None:
            self.runtime = job.build_runtime()
        for i, cell in enumerate(cells):
            # An interrupt asked for after a cell's run started and not seen by it would be cleared by the
            # next cell's run: honour it here. (Before the first cell a set flag is a stale one, of an
            # earlier run: the first run clears it.)
            if i and self.runtime.interrupt_flag.is_set():
                raise Interrupted()
            yield run_cell(self.runtime, cell, worker=self.name, on_event=self.on_event)

    def interrupt(self) -> None:
        """Stop at the next node, step or layer boundary of the running cell (it raises ``Interrupted``)."""
        if self.runtime is not None:
            self.runtime.interrupt()

    def close(self) -> None:
        self.runtime = None
