"""Running a sweep's cells on a Ray cluster: one long-lived actor per worker, each holding a runtime.

Each actor builds a runtime from the `SweepJob` once and keeps it, so its cache and model pool stay
warm across the cells it runs. Cells are routed by ``Cell.affinity``: an affinity goes to the actor
that ran it first (while that actor lives), a new one to the least-loaded actor, and an actor that
runs dry takes the later half of the longest queue (a grid over one LoRA set would otherwise keep
every other actor idle). Results come back as they finish; an actor that dies has its unfinished
cells re-run on a replacement. Actors write no output file: the driver writes them all.

Files: the LoRA files and base files/folders a cell names are checked on the worker by content
(SHA-256, the runtime's file fingerprint). A worker whose folders hold the same content under the
same name (a shared disk, or copies) uses them as they are; otherwise it asks for them, and the
driver sends their bytes through Ray's object store, put there once per content. The worker writes
them once (under its cache folder's ``loras/``, bases under its models folder, in
``.loraloom-shipped/<digest>/<name>``; written aside, checked against the digest, renamed into place
whole) and runs the cell with the names rewritten to those copies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..graph_runtime import Interrupted, LoomError, PathError, file_fingerprint, open_regular
from ..graph_runtime.cache import file_hasher
from ..graph_runtime.paths import OUTPUT_MARK, Folders, user_cache_root
from ..graph_runtime.workflow import is_link
from ..nodes import load_node_modules, registry
from .cell import Cell, CellResult, run_cell
from .executor import SweepJob

# Inputs that name a file or folder under the models folder but may also hold a value that names
# none (LoadBase's built-in presets, config "auto"): shipped when the driver finds them there.
MODEL_FILE_INPUTS = {"LoraLoomLoadBase": ("source", "config")}
SHIPPED = ".loraloom-shipped"
# A local cluster this executor starts: a small object store (Ray spills what does not fit to disk;
# its default, 30% of RAM, is far more than images and LoRA files need).
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
# Cells submitted to one actor ahead of its results: 2 hides the round trip between cells.
DEPTH = 2
# Tries of one cell whose actor died under it before it is reported failed (a cell that kills every
# worker it runs on, e.g. out of memory, must not take the whole cluster down in turn).
MAX_TRIES = 3
# Seconds a new actor may take to start (its process, imports, runtime) before the cluster is taken
# to lack room for it: Ray keeps an actor it cannot place pending, and cells sent to it would wait forever.
START_TIMEOUT = 180.0


def import_ray():
    """``ray``, or an error that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise LoomError(f"Ray is not installed ({exc}), so a sweep cannot run on a Ray cluster.", value="ray",
                        fix="pip install 'loraloom[ray]', or run the sweep without --ray",
                        kind="ray_missing") from None
    return ray


@dataclass(frozen=True)
class FileRef:
    """A file or folder a cell's prompt names: its folder ``kind`` ("loras", "models"), its ``name``
    there, its content ``digest`` (the runtime's file fingerprint) and its ``parts``: the relative
    path ("" for a plain file) and digest of each regular file in it."""

    kind: str
    name: str
    digest: str
    parts: tuple[tuple[str, str], ...]

    @property
    def shipped_name(self) -> str:
        """Where a worker keeps a shipped copy, relative to a root of ``kind``: the name's folders
        are kept (single-file checkpoints are listed only under ``checkpoints/``)."""
        rel = PurePosixPath(self.name.removesuffix(OUTPUT_MARK))
        return (rel.parent / SHIPPED / self.digest[:32] / rel.name).as_posix()


@dataclass(frozen=True)
class NeedFiles:
    """A worker's answer to a cell whose files it does not hold: the digests to send."""

    index: int
    digests: tuple[str, ...]


def _file_inputs(prompt: dict, registry) -> Iterator[tuple[str, str, str, str]]:
    """(node id, input, folder kind, value) of every constant input of ``prompt`` that may name a file."""
    for nid, node in prompt.items():
        cls = registry.get(node.get("class_type"))
        inputs = node.get("inputs", {})
        named = {inp.name: inp.file_kind for inp in cls.SCHEMA.inputs if inp.file_kind} if cls else {}
        model_inputs = MODEL_FILE_INPUTS.get(registry.canonical(node.get("class_type")), ())
        named.update({name: "models" for name in model_inputs})
        for name, kind in named.items():
            value = inputs.get(name)
            if isinstance(value, str) and value and not is_link(value):
                yield nid, name, kind, value


def _parts(path: Path) -> tuple[tuple[str, str], ...]:
    if not path.is_dir():
        return (("", file_fingerprint(path)),)
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if full.is_file():  # what file_fingerprint counts: regular files only
                found.append((full.relative_to(path).as_posix(), file_fingerprint(full)))
    return tuple(found)


def cell_files(prompt: dict, registry, folders: Folders, memo: dict | None = None) -> list[FileRef]:
    """The files and folders ``prompt`` names that the driver finds in ``folders`` (a name it does
    not find is a preset, "auto", or a problem validation reports)."""
    memo = {} if memo is None else memo
    refs = []
    for _, _, kind, value in _file_inputs(prompt, registry):
        if (kind, value) not in memo:
            try:
                path = folders.find(kind, value)
            except PathError:
                memo[kind, value] = None
            else:
                memo[kind, value] = FileRef(kind, value, file_fingerprint(path), _parts(path))
        if memo[kind, value] is not None and memo[kind, value] not in refs:
            refs.append(memo[kind, value])
    return refs


def rename_files(prompt: dict, registry, names: dict[tuple[str, str], str]) -> dict:
    """A copy of ``prompt`` with each file input ``(kind, value)`` in ``names`` set to its new name."""
    out = {nid: {**node, "inputs": dict(node.get("inputs", {}))} for nid, node in prompt.items()}
    for nid, name, kind, value in _file_inputs(prompt, registry):
        if (kind, value) in names:
            out[nid]["inputs"][name] = names[kind, value]
    return out


def worker_folders(folders: Folders, cache: Path) -> Folders:
    """The folders a worker's runtime uses: ``folders`` plus ``cache/loras`` as the last LoRA folder
    (shipped LoRAs), and ``cache/models`` as the models folder where ``folders``' one does not exist
    on this machine."""
    models = folders.models_dir if folders.models_dir.is_dir() else cache / "models"
    return dataclasses.replace(folders, lora_dirs=[*folders.lora_dirs, cache / "loras"], models_dir=models)


class Worker:
    """What one Ray actor holds: a runtime built from the job, and which files it holds under which
    name. ``run(cell, files, blobs)`` runs the cell (a `CellResult`), or answers `NeedFiles` when a
    file is neither in its folders with the same content nor shipped yet; ``blobs`` maps a part's
    digest to its bytes (an object reference Ray resolves here, on the worker)."""

    def __init__(self, job: SweepJob, name: str, cache_dir: str | None = None, threads: int | None = None):
        self.name = name
        self.error = None
        self.stopped = -1  # the last of the driver's runs interrupted
        try:
            if threads:
                import torch

                # CPU kernels split their reductions by thread count: the same count gives the same bits.
                torch.set_num_threads(threads)
            self.cache = Path(cache_dir) if cache_dir else user_cache_root() / "ray-files"
            self.folders = worker_folders(job.folders, self.cache)
            self.runtime = job.with_folders(self.folders).build_runtime()
        except Exception as exc:  # noqa: BLE001 - kept for ready(), which re-raises it in the driver
            self.error = exc

    def ready(self) -> dict:
        """Where this worker runs; raises what went wrong building its runtime."""
        if self.error is not None:
            raise self.error
        return {"name": self.name, "host": socket.gethostname(), "pid": os.getpid()}

    def interrupt(self, run: int) -> None:
        """Stop the driver's ``run``: the running cell at its next node, step or layer boundary, and
        the cells of that run already sent here before they start."""
        self.stopped = max(self.stopped, run)
        self.runtime.interrupt()

    def run(self, cell: Cell, files: list[FileRef], blobs: dict, run: int = 0) -> CellResult | NeedFiles:
        if run <= self.stopped:
            raise Interrupted()
        renames, missing = {}, []
        for ref in files:
            name = self._local_name(ref, blobs)
            if name is None:
                missing.append(ref.digest)
            elif name != ref.name:
                renames[ref.kind, ref.name] = name
        if missing:
            return NeedFiles(cell.index, tuple(missing))
        if renames:
            cell = dataclasses.replace(cell, prompt=rename_files(cell.prompt, self.runtime.registry, renames))
        return run_cell(self.runtime, cell, worker=self.name)

    def _root(self, kind: str) -> Path:
        return self.cache / "loras" if kind == "loras" else self.folders.models_dir

    def _local_name(self, ref: FileRef, blobs: dict) -> str | None:
        # checked for every cell: a fingerprint is remembered per file state, so this is a stat when
        # nothing changed, and a file replaced on this machine since is never taken for the driver's
        for name in (ref.name, ref.shipped_name):
            try:
                path = self.folders.find(ref.kind, name)
            except PathError:
                continue
            if file_fingerprint(path) == ref.digest:
                return name
        if not all(digest in blobs for _, digest in ref.parts):
            return None
        self._materialise(ref, blobs)
        return ref.shipped_name

    def _materialise(self, ref: FileRef, blobs: dict) -> None:
        import ray

        final = self._root(ref.kind) / ref.shipped_name
        staging = final.parent.parent / f".staging-{uuid.uuid4().hex}"
        target = staging / final.name
        try:
            for rel, digest in ref.parts:
                path = target / rel if rel else target
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(ray.get(blobs[digest]))
                except OSError as exc:
                    raise LoomError(f"worker {self.name} cannot write its copy of {ref.kind} {ref.name!r}: "
                                    f"{exc.strerror or exc}.", file=path, kind="ship_failed",
                                    fix="free space or grant write access in the worker's cache folder "
                                        "(RayExecutor's cache_dir)") from None
            if file_fingerprint(target) != ref.digest:
                raise LoomError(f"the copy of {ref.kind} {ref.name!r} shipped to worker {self.name} does not have "
                                f"the content the driver hashed ({ref.digest}).", file=ref.name, value=ref.digest,
                                fix="make sure the file does not change while the sweep runs", kind="ship_mismatch")
            # one rename puts the whole copy in place: a worker killed mid-copy leaves only the staging
            # folder; where another worker on this machine was first, its copy (the same bytes) stays
            try:
                os.rename(staging, final.parent)
            except OSError:
                if not final.exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _driver_threads() -> int:
    import torch

    return torch.get_num_threads()


def _read_part(path: Path, digest: str) -> bytes:
    """The bytes of a regular file, checked against the digest the cell's files were given."""
    with open_regular(path) as (f, _state):
        data = f.read()
    hasher = file_hasher()
    hasher.update(data)
    if hasher.hexdigest() != digest:
        raise LoomError("this file changed after the sweep hashed it, so its copy for a worker would not match.",
                        file=path, value=digest, fix="run the sweep again once the file stays put",
                        kind="changed_while_reading")
    return data


@dataclass
class _Slot:
    """One worker: its actor (replaced when it dies), queued cells and cells in flight."""

    index: int
    actor: object = None
    generation: int = 0
    queue: deque = dataclasses.field(default_factory=deque)
    inflight: int = 0

    @property
    def name(self) -> str:
        return f"ray-{self.index}" + (f".{self.generation}" if self.generation else "")


class RayExecutor:
    """Runs a sweep's cells on Ray actors (see the module's docstring).

    ``address``: the cluster to join (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None
    starts a local one (``local_cpus`` CPUs, default all) unless Ray is already initialised in this
    process. ``workers``: how many actors (default: one per GPU where the cluster has GPUs, else one
    per ``cpus_per_worker`` CPUs). Each actor reserves ``cpus_per_worker`` CPUs (and one GPU on a GPU
    cluster) and runs torch with ``threads`` threads, by default as many as torch uses in this
    process: CPU kernels split their sums by thread count, so CPU images are bit-identical to a local
    run with the same count (pass ``threads=1`` where workers x threads exceed the cores). ``worker_folders``: the folders workers use where they
    differ from the driver's (default: the job's); ``cache_dir``: where workers keep shipped files
    (default: their user cache). ``steal=False`` keeps every affinity on its actor even when another
    actor is idle. ``runtime_env``: Ray's, for the actors (e.g. ``{"py_modules": [...]}``).
    ``interrupt_flag``: an event (a runtime's ``interrupt_flag``) that, set during a run, interrupts
    it as :meth:`interrupt` does."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, *, cpus_per_worker: float = 1,
                 threads: int | None = None, worker_folders: Folders | None = None, cache_dir: str | None = None,
                 steal: bool = True, runtime_env: dict | None = None, local_cpus: int | None = None,
                 interrupt_flag: threading.Event | None = None):
        self.address = address
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.threads = threads
        self.worker_folders = worker_folders
        self.cache_dir = cache_dir
        self.steal = steal
        self.runtime_env = runtime_env
        self.local_cpus = local_cpus
        self.interrupt_flag = interrupt_flag
        self.slots: list[_Slot] = []
        self._job: SweepJob | None = None
        self._started_ray = False
        self._blobs: dict[str, object] = {}  # part digest -> its bytes in the object store
        self._affinity: dict[str, _Slot] = {}  # affinity -> the worker that has its state
        self._interrupted = False
        self._run = 0
        self._order: dict[int, int] = {}

    # -- cluster and actors -------------------------------------------------------------------------

    def _connect(self):
        ray = import_ray()
        if not ray.is_initialized():
            if self.address is None:
                # Its workers inherit this process's environment, PYTHONPATH included, so they import the
                # package this driver runs (a checkout too). Quiet: Ray's start-up notices are not the
                # sweep's output (its errors still raise).
                ray.init(num_cpus=self.local_cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                         include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            else:
                ray.init(address=self.address)
            self._started_ray = True
        return ray

    def start(self, job: SweepJob) -> None:
        """Start the actors for ``job`` now (``run`` does it on first use, and again for another job)."""
        if self.slots and job == self._job:
            return
        self.close_actors()
        ray = self._connect()
        self._job = job
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = self.workers or gpus or max(1, int(resources.get("CPU", 1) // self.cpus_per_worker))
        self.slots = [_Slot(i) for i in range(count)]
        for slot in self.slots:
            self._spawn(slot)
        # a worker that cannot build its runtime (a node module missing there) fails the sweep at once
        started = self._await_ready(self.slots)
        if len(started) < count:
            self.close_actors()
            raise LoomError(f"only {len(started)} of {count} Ray workers started within {START_TIMEOUT:.0f} s; the "
                            f"cluster offers {resources.get('CPU', 0):g} CPUs and {gpus} GPUs.", value=count,
                            limit=len(started), kind="ray_workers_pending",
                            fix="ask for fewer workers, or add machines to the cluster (ray status shows what is free)")

    def _await_ready(self, slots: list[_Slot]) -> list[_Slot]:
        """The slots whose actor started within START_TIMEOUT; raises what a worker's runtime raised."""
        ray = import_ray()
        refs = {slot.actor.ready.options(concurrency_group="control").remote(): slot for slot in slots}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=START_TIMEOUT)
        ready = []
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                raise (exc.cause if isinstance(exc.cause, BaseException) else exc) from None
            ready.append(refs[ref])
        return ready

    def _spawn(self, slot: _Slot) -> None:
        ray = import_ray()
        options = {"num_cpus": self.cpus_per_worker, "max_restarts": 0, "max_task_retries": 0}
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            options["num_gpus"] = 1
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        threads = self.threads or _driver_threads()
        job = self._job if self.worker_folders is None else self._job.with_folders(self.worker_folders)
        # a second thread for interrupt(): run() calls still go one at a time
        actor_class = ray.remote(concurrency_groups={"control": 1})(Worker)
        slot.actor = actor_class.options(**options).remote(job, slot.name, self.cache_dir, threads)

    def actor(self, name: str):
        """The Ray actor handle of the live worker named ``name`` (``CellResult.worker``)."""
        return next(slot.actor for slot in self.slots if slot.name == name)

    # -- routing -----------------------------------------------------------------------------------

    def _route(self, cell: Cell) -> _Slot:
        slot = self._affinity.get(cell.affinity)
        if slot is None or slot not in self.slots:
            slot = min(self.slots, key=lambda s: (len(s.queue) + s.inflight, s.index))
            self._affinity[cell.affinity] = slot
        return slot

    def _steal_for(self, idle: _Slot) -> None:
        victim = max(self.slots, key=lambda s: len(s.queue))
        if victim is idle or len(victim.queue) < 2:
            return
        # the later half: the victim keeps the cells next in its reuse order
        taken = [victim.queue.pop() for _ in range(len(victim.queue) // 2)]
        idle.queue.extend(reversed(taken))

    # -- the run -----------------------------------------------------------------------------------

    def run(self, cells: list[Cell], job: SweepJob) -> Iterator[CellResult]:
        """Yield each cell's result as it finishes (any order); see :class:`~.executor.Executor`."""
        ray = import_ray()
        from ray.exceptions import RayActorError, RayTaskError

        self.start(job)
        self._interrupted = False
        self._run += 1  # numbers this run's cells: an interrupt stops those already sent, not later runs'
        if self.interrupt_flag is not None:
            self.interrupt_flag.clear()  # as a run clears it: only an interrupt asked from now on counts
        load_node_modules(list(job.node_modules))
        memo: dict = {}
        files = {}
        self._order = {cell.index: i for i, cell in enumerate(cells)}
        for cell in cells:
            files[cell.index] = cell_files(cell.prompt, registry(), job.folders, memo)
            self._route(cell).queue.append((cell, {}))
        tries: dict[int, int] = {}
        inflight: dict = {}  # object ref -> (slot, cell, blobs)
        while inflight or any(s.queue for s in self.slots):
            if self.interrupt_flag is not None and self.interrupt_flag.is_set() and not self._interrupted:
                self.interrupt()
            if not self._interrupted:
                for slot in self.slots:
                    if not slot.queue and not slot.inflight and self.steal:
                        self._steal_for(slot)
                    while slot.queue and slot.inflight < DEPTH:
                        cell, blobs = slot.queue.popleft()
                        ref = slot.actor.run.remote(cell, files[cell.index], blobs, self._run)
                        inflight[ref] = (slot, cell, blobs)
                        slot.inflight += 1
            elif not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                slot, cell, blobs = inflight.pop(ref)
                slot.inflight -= 1
                try:
                    out = ray.get(ref)
                except RayActorError:
                    yield from self._lost(slot, cell, blobs, inflight, tries)
                    continue
                except RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    if isinstance(cause, Interrupted):
                        self._interrupted = True
                        continue
                    raise cause from None
                if isinstance(out, NeedFiles):
                    if all(digest in blobs for digest in out.digests):  # sent, yet still missing: never loop
                        raise LoomError(f"worker {slot.name} could not take the files of cell {cell.index} it was "
                                        "sent.", value=list(out.digests), kind="ship_failed",
                                        fix="check the worker's cache folder (free space, permissions)")
                    self._requeue(slot, [(cell, self._ship(files[cell.index], out.digests, blobs))])
                else:
                    yield out
        if self._interrupted:
            for slot in self.slots:
                slot.queue.clear()
            raise Interrupted()

    def _requeue(self, slot: _Slot, items: list) -> None:
        """Put (cell, blobs) items back on ``slot``'s queue, which stays in the planner's order."""
        slot.queue = deque(sorted([*slot.queue, *items], key=lambda item: self._order[item[0].index]))

    def _lost(self, slot: _Slot, cell: Cell, blobs: dict, inflight: dict, tries: dict) -> Iterator[CellResult]:
        """``slot``'s actor died: its cells in flight (each up to MAX_TRIES times) and queued go to a
        replacement, or to the other workers where no replacement can start."""
        ray = import_ray()
        died = [(cell, blobs)] + [(c, b) for r, (s, c, b) in inflight.items() if s is slot]
        for ref in [r for r, (s, _, _) in inflight.items() if s is slot]:
            del inflight[ref]
        slot.inflight = 0
        gone = slot.name
        with contextlib.suppress(Exception):  # dead already, or only unreachable: it must not run on
            ray.kill(slot.actor)
        slot.generation += 1
        self._spawn(slot)
        target = slot
        if not self._await_ready([slot]):  # no room for a replacement (its machine is gone): the others go on
            with contextlib.suppress(Exception):
                ray.kill(slot.actor)
            self.slots.remove(slot)
            if not self.slots:
                raise LoomError(f"every Ray worker died (last: {gone}) and none could be started again within "
                                f"{START_TIMEOUT:.0f} s.", kind="ray_workers_lost",
                                fix="check the cluster (ray status) and the workers' logs")
            target = min(self.slots, key=lambda s: (len(s.queue) + s.inflight, s.index))
            self._requeue(target, list(slot.queue))
        retry = []
        for lost_cell, lost_blobs in died:
            tries[lost_cell.index] = tries.get(lost_cell.index, 0) + 1
            if tries[lost_cell.index] >= MAX_TRIES:
                error = LoomError(f"the Ray worker running this cell died {MAX_TRIES} times (last: {gone}).",
                                  value=MAX_TRIES, limit=MAX_TRIES, kind="worker_lost",
                                  fix="check the workers' memory and logs (ray logs)")
                yield CellResult(lost_cell.index, error=error.to_json(), worker=gone)
            else:
                retry.append((lost_cell, lost_blobs))
        self._requeue(target, retry)

    def _ship(self, refs: list[FileRef], digests: tuple[str, ...], blobs: dict) -> dict:
        """``blobs`` plus the object-store references of every part of the files named by ``digests``."""
        ray = import_ray()
        blobs = dict(blobs)
        for ref in refs:
            if ref.digest not in digests:
                continue
            path = self._job.folders.find(ref.kind, ref.name)
            for rel, digest in ref.parts:
                if digest not in self._blobs:
                    self._blobs[digest] = ray.put(_read_part(path / rel if rel else path, digest))
                blobs[digest] = self._blobs[digest]
        return blobs

    # -- stopping ----------------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Stop: no new cell starts, running ones stop at their next boundary; ``run`` then raises
        ``Interrupted`` after yielding what finished."""
        self._interrupted = True
        for slot in self.slots:
            slot.actor.interrupt.options(concurrency_group="control").remote(self._run)

    def close_actors(self) -> None:
        """End the actors (their runtimes and model pools go with them)."""
        if self.slots:
            ray = import_ray()
            for slot in self.slots:
                ray.kill(slot.actor)
        self.slots, self._affinity, self._blobs = [], {}, {}

    def close(self) -> None:
        """End the actors, and the local Ray instance when this executor started it."""
        self.close_actors()
        if self._started_ray:
            import_ray().shutdown()
            self._started_ray = False
