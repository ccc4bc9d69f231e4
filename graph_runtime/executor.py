"""The caching executor: runs only the dirty nodes that some output needs.

A node's cache key is a Merkle signature over its class, version, constant inputs, file
fingerprints and its ancestors' keys. A node is dirty exactly when its key is absent from the store.
A result is stored under the key of the bytes it was computed from: a node that reports what it read
(``report_read``) is stored under that content's key; a file that changed while its node ran, and
that the node did not report, keeps the result out of the cache.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx

from .cache import (DEFAULT_CACHE_BYTES, CacheStore, Entry, node_key, pinned_fingerprints, strict_fingerprints,
                    watch_files)
from .context import ExecutionContext, reset_context, use_context
from .diskcache import DiskCache, entry_key
from .errors import ExecutionError, Interrupted, LoomError
from .files import FileState, changed_while_reading, path_state
from .graph import ValidPrompt, validate_prompt
from .limits import Limits
from .paths import Folders
from .schema import NodeRegistry, input_fingerprint
from .workflow import Workflow, apply_overrides, is_link, load_workflow

Event = dict
Listener = Callable[[Event], None]


@dataclass
class RunResult:
    """What a run did. ``outputs`` maps output node ids to their UI output (also when cached);
    ``values`` holds the output values of every node this run needed. ``disk_cached``: the nodes of
    ``cached`` whose results came from the disk cache (computed by an earlier process)."""

    prompt_id: str
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    disk_cached: list[str] = field(default_factory=list)
    outputs: dict[str, dict] = field(default_factory=dict)
    values: dict[str, tuple] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def value(self, node_id: str | int, slot: int = 0):
        """The value on output ``slot`` of node ``node_id``."""
        return self.values[str(node_id)][slot]


def _summarise(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


class Runtime:
    """Runs workflows, keeping a byte-bounded cache across runs.

    ``rt.run(workflow, overrides=None)`` takes a path, an API dict or a UI dict. Folders are
    configured by arguments, then environment variables, then defaults (see :mod:`.paths`); so are
    the ``limits`` on what one workflow may ask for (see :mod:`.limits`).

    ``strict_files=True``: every run hashes the content of every file it uses instead of trusting a
    file's unchanged state (size, mtime, ctime, inode) for a digest computed earlier, and a node that
    reads a file whose content differs from what the run hashed for its key fails (the file changed
    while the run used it) instead of running on a possible mix of old and new bytes.

    Nodes declared with ``persist`` also keep their results in a disk cache shared by every process
    (see :mod:`.diskcache`): ``disk_cache_dir`` and ``disk_cache_bytes`` (0: off), else
    ``LORALOOM_DISK_CACHE_DIR`` and ``LORALOOM_DISK_CACHE_BYTES``, else the defaults.
    """

    def __init__(self, *, registry: NodeRegistry | None = None, nodes=(), cache_bytes: int = DEFAULT_CACHE_BYTES,
                 lora_dirs=None, models_dir=None, output_dir=None, folders: Folders | None = None,
                 limits: Limits | None = None, strict_files: bool = False, disk_cache_dir=None,
                 disk_cache_bytes: int | None = None):
        self.registry = registry.copy() if registry is not None else NodeRegistry()
        for cls in nodes:
            self.registry.register(cls)
        self.folders = folders or Folders.configure(lora_dirs, models_dir, output_dir)
        self.limits = limits or Limits.configure()
        self.cache = CacheStore(cache_bytes)
        self.disk_cache = DiskCache.configure(disk_cache_dir, disk_cache_bytes)
        self.strict_files = strict_files
        self.resources: dict[str, Any] = {}
        self._interrupt = threading.Event()
        self._run_lock = threading.Lock()
        self._running = threading.local()  # .active: this thread is inside a run (its nodes may nest runs)
        self._listeners: list[Listener] = []

    def register(self, cls: type) -> type:
        """Add a node class of your own (declared with ``@node``) to this runtime."""
        return self.registry.register(cls)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every event of every run."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def interrupt(self) -> None:
        """Ask the current run to stop at the next node, step or layer boundary."""
        self._interrupt.set()

    @property
    def interrupt_flag(self) -> threading.Event:
        """The event :meth:`interrupt` sets (each run clears it as it starts): work this runtime hands
        to other processes (a sweep's Ray workers) watches it to stop too."""
        return self._interrupt

    def load(self, workflow, overrides=None) -> Workflow:
        """Read a workflow (path, API dict, UI dict) and apply overrides."""
        wf = load_workflow(workflow, self.registry)
        apply_overrides(wf.prompt, overrides, wf.source)
        return wf

    @contextlib.contextmanager
    def context(self):
        """This runtime's folders, resources and limits as the current context (COMBO lists, validation)."""
        token = use_context(ExecutionContext(folders=self.folders, resources=self.resources,
                                             interrupt_flag=self._interrupt, limits=self.limits,
                                             strict_files=self.strict_files))
        try:
            yield
        finally:
            reset_context(token)

    def validate(self, workflow, overrides=None) -> ValidPrompt:
        """Validate without running; raises ValidationError listing every problem."""
        with self.context():
            return validate_prompt(self.load(workflow, overrides).prompt, self.registry, self.folders)

    def object_info(self) -> dict:
        """Every node in ComfyUI's ``/object_info`` shape, with COMBO lists from this runtime's folders."""
        with self.context():
            return self.registry.object_info()

    def run(self, workflow, overrides=None, *, on_event: Listener | None = None,
            prompt_id: str | None = None, outputs: list | None = None) -> RunResult:
        """Validate, then execute the dirty nodes that the output nodes (or ``outputs``) need."""
        if getattr(self._running, "active", False):
            # Called by a node of the current run (in its thread): a nested prompt, run within this run
            # (the lock is held by it, an interrupt stops both); only ``on_event`` hears its events.
            return self._run(workflow, overrides, on_event, prompt_id, outputs, nested=True)
        with self._run_lock:
            self._interrupt.clear()
            self._running.active = True
            try:
                return self._run(workflow, overrides, on_event, prompt_id, outputs, nested=False)
            finally:
                self._running.active = False

    def _run(self, workflow, overrides, on_event: Listener | None, prompt_id: str | None, outputs: list | None,
             nested: bool) -> RunResult:
        wf = self.load(workflow, overrides)
        with self.context():
            valid = validate_prompt(wf.prompt, self.registry, self.folders)
        result = RunResult(prompt_id or uuid.uuid4().hex)
        emit = self._emitter(on_event, result.prompt_id, listeners=not nested)
        targets = [str(o) for o in outputs] if outputs is not None else valid.outputs
        unknown = [t for t in targets if t not in valid.nodes]
        if unknown:
            raise LoomError(f"outputs {unknown} are not nodes of {wf.source}")
        emit({"event": "execution_start"})
        try:
            with strict_fingerprints() if self.strict_files else contextlib.nullcontext():
                self._execute(wf, valid, targets, result, emit)
        except Interrupted as exc:
            emit({"event": "execution_interrupted", "node": exc.node_id,
                  "executed": list(result.executed)})
            raise
        except ExecutionError as exc:
            emit({"event": "execution_error", "node": exc.node_id, "class_type": exc.class_type,
                  "executed": list(result.executed), **exc.to_json()})
            raise
        emit({"event": "execution_success"})
        return result

    def _emitter(self, on_event: Listener | None, prompt_id: str, listeners: bool = True) -> Callable[[Event], None]:
        listeners = (list(self._listeners) if listeners else []) + ([on_event] if on_event else [])

        def emit(event: Event) -> None:
            event["prompt_id"] = prompt_id
            for listener in listeners:
                listener(event)

        return emit

    def node_keys(self, valid: ValidPrompt, nodes=None) -> dict[str, str]:
        """The cache key under which each of ``nodes`` (default: every node) of a validated prompt would
        be looked up if it ran now, computed as a run computes it (files fingerprinted), running nothing.
        A sweep plans its order with them: cells whose nodes share keys share results."""
        with self.context():
            return self._keys(valid, set(valid.nodes) if nodes is None else {str(n) for n in nodes})[0]

    def _keys(self, valid: ValidPrompt, needed: set[str]) -> tuple[dict[str, str], dict[str, dict]]:
        """Cache keys of the needed nodes, in topological order (no recursion), and per node the
        files its key fingerprints: ``{real path: (state, digest)}``."""
        keys: dict[str, str] = {}
        files: dict[str, dict] = {}
        for nid in valid.order:
            if nid in needed:
                with watch_files() as files[nid]:
                    keys[nid] = self._key(nid, valid, keys)
        return keys, files

    def _key(self, nid: str, valid: ValidPrompt, keys: dict[str, str]) -> str:
        node = valid.nodes[nid]
        schema = self.registry.get(node["class_type"]).SCHEMA
        constants, links = {}, {}
        for name, value in node["inputs"].items():
            if is_link(value):
                links[name] = (keys[value[0]], value[1])
            else:
                constants[name] = value
        try:
            fingerprint = input_fingerprint(schema, node["inputs"], self.folders)
        except LoomError as exc:  # an unreadable or hostile file input: name the node, not a traceback
            raise ExecutionError(nid, node["class_type"], str(exc), exception_type=type(exc).__name__,
                                 cause=exc) from exc
        # The id, not the prompt's class_type: a node placed under an alias (older id) shares its results.
        return node_key(schema.id, schema.version, constants, links, fingerprint,
                        volatile=schema.not_idempotent, node_id=nid)

    def _settled_key(self, nid: str, valid: ValidPrompt, keys: dict[str, str], first_keys: dict[str, str],
                     files: dict[str, tuple[FileState, str]], reads: dict[str, str]) -> str | None:
        """The key a node's fresh result belongs under: that of the bytes it was computed from.

        A file the node reported reading counts with the digest it read. A file it did not report
        must still be in the state its key was computed in, else what it read is unknown: None, the
        result is not cached. With a changed upstream key (an ancestor read other bytes) or a
        reported digest, the key is computed again from those."""
        node = valid.nodes[nid]
        pins: dict[str, str] = {}
        for real, (state, digest) in files.items():
            if real in reads:
                if reads[real] != digest and self.strict_files:
                    cause = changed_while_reading(real)
                    raise ExecutionError(nid, node["class_type"], str(cause), exception_type="FileError",
                                         cause=cause)
                pins[real] = reads[real]
            elif path_state(real) != state:
                return None
            else:
                pins[real] = digest
        upstream_changed = any(keys[v[0]] != first_keys[v[0]] for v in node["inputs"].values() if is_link(v))
        if not upstream_changed and all(pins[real] == digest for real, (_, digest) in files.items()):
            return keys[nid]
        with pinned_fingerprints(pins):
            return self._key(nid, valid, keys)

    def _execute(self, wf: Workflow, valid: ValidPrompt, targets: list[str], result: RunResult, emit) -> None:
        ancestors: set[str] = set(targets)
        for t in targets:
            ancestors |= nx.ancestors(valid.graph, t)
        keys, files = self._keys(valid, ancestors)
        first_keys = dict(keys)
        uncached: set[str] = set()  # ran on inputs whose content is unknown: neither they nor descendants cached

        # Walk back from the outputs, stopping at cache hits: a cached node's ancestors are not needed.
        hits: dict[str, Any] = {}
        dirty: set[str] = set()
        stack = list(targets)
        while stack:
            nid = stack.pop()
            if nid in hits or nid in dirty:
                continue
            entry = self.cache.get(keys[nid])
            if entry is None:
                entry = self._disk_get(nid, valid, keys[nid], emit)
                if entry is not None:
                    result.disk_cached.append(nid)
            if entry is not None:
                hits[nid] = entry
            else:
                dirty.add(nid)
                stack.extend(self._eager_sources(valid.nodes[nid]))

        values: dict[str, tuple] = {}
        for nid, entry in hits.items():
            values[nid] = entry.outputs
            if entry.ui is not None and nid in targets:
                result.outputs[nid] = entry.ui
        result.cached = sorted(hits, key=_order_key)
        result.disk_cached.sort(key=_order_key)
        if hits:
            emit({"event": "execution_cached", "nodes": list(result.cached), "disk": list(result.disk_cached)})

        order = [n for n in valid.order if n in dirty]
        ctx_base = dict(folders=self.folders, prompt=wf.prompt, workflow=wf.ui, resources=self.resources,
                        interrupt_flag=self._interrupt, limits=self.limits, strict_files=self.strict_files,
                        runtime=self)

        def on_progress(node_id, value, total):
            emit({"event": "progress", "node": node_id, "class_type": valid.nodes[node_id]["class_type"],
                  "value": value, "max": total})

        emit({"event": "execution_plan", "nodes": list(order)})
        for nid in order:
            if self._interrupt.is_set():
                raise Interrupted(nid)
            node = valid.nodes[nid]
            class_type = node["class_type"]
            emit({"event": "executing", "node": nid, "class_type": class_type})
            lazy = self.registry.get(class_type).SCHEMA.lazy_inputs
            kwargs = {name: (values[v[0]][v[1]] if is_link(v) and name not in lazy else v)
                      for name, v in node["inputs"].items()}
            ctx = ExecutionContext(node_id=nid, class_type=class_type, on_progress=on_progress, file_reads={},
                                   **ctx_base)
            start = time.perf_counter()
            outputs, ui = self._call(nid, class_type, kwargs, ctx)
            result.timings[nid] = time.perf_counter() - start
            values[nid] = outputs
            result.executed.append(nid)
            if not self.registry.get(class_type).SCHEMA.not_idempotent:
                key = None
                if not any(is_link(v) and v[0] in uncached for v in node["inputs"].values()):
                    key = self._settled_key(nid, valid, keys, first_keys, files[nid], ctx.file_reads)
                if key is None:
                    uncached.add(nid)
                else:
                    keys[nid] = key
                    self.cache.put(key, outputs, ui)
                    self._disk_put(nid, class_type, key, outputs, ui, emit)
            if ui is not None and nid in targets:
                result.outputs[nid] = ui
            emit({"event": "executed", "node": nid, "class_type": class_type, "output": ui,
                  "seconds": result.timings[nid]})
        result.values = values

    def _eager_sources(self, node: dict) -> list[str]:
        """The nodes whose values a node takes: those linked to its inputs, less its lazy ones."""
        lazy = self.registry.get(node["class_type"]).SCHEMA.lazy_inputs
        return [v[0] for name, v in node["inputs"].items() if is_link(v) and name not in lazy]

    def _persist(self, class_type: str):
        """The codec of a node kept in the disk cache, or None (not declared, or the cache is off)."""
        return self.registry.get(class_type).SCHEMA.persist if self.disk_cache.enabled else None

    def _note(self, emit, nid: str, class_type: str):
        return lambda text: emit({"event": "cache_note", "node": nid, "class_type": class_type, "message": text})

    def _disk_get(self, nid: str, valid: ValidPrompt, key: str, emit) -> Entry | None:
        """A node's result from the disk cache, also put into the memory cache; None on a miss."""
        class_type = valid.nodes[nid]["class_type"]
        codec = self._persist(class_type)
        disk_key = entry_key(key, codec) if codec is not None else None
        if disk_key is None:
            return None
        found = self.disk_cache.get(disk_key, codec, self._note(emit, nid, class_type))
        if found is None:
            return None
        self.cache.put(key, *found)
        return Entry(found[0], found[1], 0)

    def _disk_put(self, nid: str, class_type: str, key: str, outputs: tuple, ui: dict | None, emit) -> None:
        codec = self._persist(class_type)
        disk_key = entry_key(key, codec) if codec is not None else None
        if disk_key is not None:
            self.disk_cache.put(disk_key, codec, outputs, ui, self._note(emit, nid, class_type))

    def _call(self, nid: str, class_type: str, kwargs: dict, ctx: ExecutionContext) -> tuple[tuple, dict | None]:
        cls = self.registry.get(class_type)
        schema = cls.SCHEMA
        token = use_context(ctx)
        try:
            ret = cls().execute(**kwargs)
        except Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - every node failure becomes one named error
            raise ExecutionError(nid, class_type, f"{type(exc).__name__}: {exc}",
                                 exception_type=f"{type(exc).__module__}.{type(exc).__name__}",
                                 traceback=traceback.format_exception(exc),
                                 inputs={k: _summarise(v) for k, v in kwargs.items()}, cause=exc) from exc
        finally:
            reset_context(token)
        ui = None
        if isinstance(ret, dict):
            ui = ret.get("ui")
            ret = ret.get("result", ())
        if ret is None:
            ret = ()
        if not isinstance(ret, tuple) or len(ret) != len(schema.outputs):
            raise ExecutionError(nid, class_type, f"execute() returned {_summarise(ret)}, expected a tuple of "
                                 f"{len(schema.outputs)} output(s) {[o.type for o in schema.outputs]}")
        return ret, ui


def _order_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)
