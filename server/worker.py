"""The worker: one thread that runs queued prompts in order over the shared Runtime.

It turns the runtime's events into ComfyUI's websocket messages and records each run in the store.
Cancelling is atomic with respect to the worker taking the next prompt: both happen under one lock,
so a late cancel of a finished prompt never reaches the one after it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback

from ..graph_runtime import ExecutionError, Interrupted, LoomError, ValidationError, Workflow
from .hub import Hub
from .store import ERROR, INTERRUPTED, SUCCESS, PromptStore, QueueItem

log = logging.getLogger("loraloom.server")

DELETED, INTERRUPTING, FINISHED, UNKNOWN = "deleted", "interrupting", "finished", "unknown"
# A queued item whose extra_data holds this key is a sweep: its value is the sweep's definition (SweepSpec JSON).
SWEEP_KEY = "loraloom_sweep"
# The runtime events of a sweep's cells passed on to its client: each cell's start, success or failure
# is the sweep's business (a `sweep_cell` message), not the end of the queued item.
SWEEP_EVENTS = ("executing", "progress", "execution_cached")


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Run:
    """One prompt's run: forwards events to its client and keeps what the history records."""

    def __init__(self, item: QueueItem, hub: Hub):
        self.item = item
        self.hub = hub
        self.sid = item.extra_data.get("client_id")
        self.outputs: dict[str, dict] = {}
        self.messages: list[list] = []
        self.started = False
        self.terminal: tuple[str, dict] | None = None

    def send(self, type_: str, data: dict, record: bool = False) -> None:
        data = {**data, "prompt_id": self.item.prompt_id}
        if record:
            data["timestamp"] = _now_ms()
            self.messages.append([type_, data])
        self.hub.publish(type_, data, self.sid)

    def class_of(self, node_id) -> str:
        node = self.item.prompt.get(str(node_id)) if node_id is not None else None
        return node.get("class_type", "") if isinstance(node, dict) else ""

    def on_event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "execution_start":
            self.started = True
            self.send("execution_start", {}, record=True)
        elif kind == "execution_cached":
            self.send("execution_cached", {"nodes": list(event["nodes"])}, record=True)
        elif kind == "executing":
            self.send("executing", {"node": event["node"], "display_node": event["node"]})
        elif kind == "progress":
            self.send("progress", {"value": event["value"], "max": event["max"], "node": event["node"]})
        elif kind == "executed" and event.get("output") is not None:
            self.outputs[event["node"]] = event["output"]
            self.send("executed", {"node": event["node"], "display_node": event["node"], "output": event["output"]})
        elif kind == "execution_error":
            self.terminal = ("execution_error", {
                "node_id": event["node_id"], "node_type": event["node_type"], "executed": event["executed"],
                "exception_message": event["exception_message"], "exception_type": event["exception_type"],
                "traceback": event["traceback"], "current_inputs": event["current_inputs"], "current_outputs": {},
                "extra_info": event["extra_info"]})
        elif kind == "execution_interrupted":
            node = event.get("node")
            self.terminal = ("execution_interrupted", {"node_id": node or "", "node_type": self.class_of(node),
                                                       "executed": event["executed"]})
        elif kind == "execution_success":
            self.terminal = ("execution_success", {})
        elif kind == "cache_note":  # a disk cache entry discarded or not stored: the run goes on
            log.warning("prompt %s node %s (%s): %s", self.item.prompt_id, event["node"], event["class_type"],
                        event["message"])

    def fail(self, exc: BaseException, node_id: str = "", node_type: str = "") -> None:
        """A failure outside any node (the prompt no longer validates, or the runtime itself raised)."""
        if not self.started:
            self.send("execution_start", {}, record=True)
        lines = traceback.format_exception(exc) if not isinstance(exc, ValidationError) else []
        message = exc.describe() if isinstance(exc, ValidationError) else f"{type(exc).__name__}: {exc}"
        # the fields as in a node's failure (ExecutionError.to_json): the cause's, or this error's own
        extra = {}
        if isinstance(exc, ExecutionError):
            extra = exc.cause_fields
        elif isinstance(exc, LoomError):
            extra = exc.fields()
        self.terminal = ("execution_error", {
            "node_id": node_id, "node_type": node_type, "executed": [], "exception_message": message,
            "exception_type": f"{type(exc).__module__}.{type(exc).__name__}", "traceback": lines,
            "current_inputs": {}, "current_outputs": {}, "extra_info": extra})


class Worker:
    """Runs prompts from ``store`` one at a time on ``runtime``, in its own thread."""

    def __init__(self, runtime, store: PromptStore, hub: Hub, sweep_executor: str = "local",
                 ray_address: str | None = None):
        self.runtime = runtime
        self.store = store
        self.hub = hub
        self.sweep_executor = sweep_executor
        self.ray_address = ray_address
        self._remote = None  # the sweeps' remote executor (Ray), made once: its workers stay warm
        self._lock = threading.Lock()  # the running id and its cancel flag; claiming; cancelling
        self._current: str | None = None
        self._cancel = False
        self._free = {"unload_models": False, "free_memory": False}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running_id(self) -> str | None:
        return self._current

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraloom-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Interrupt the running prompt and end the thread (a prompt that does not reach an interrupt
        point in time stays ``running`` in the store and is marked interrupted at the next start)."""
        self._stop.set()
        self.interrupt()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._remote is not None:
            self._remote.close()

    def notify(self) -> None:
        """Something was queued (or memory should be freed): wake the worker."""
        self._wake.set()

    def cancel(self, prompt_id: str) -> str:
        """Cancel one prompt: a pending one is removed, the running one interrupted. Returns
        ``"deleted"``, ``"interrupting"``, ``"finished"`` (nothing to do) or ``"unknown"``."""
        with self._lock:
            if self._current == prompt_id:
                self._request_interrupt()
                return INTERRUPTING
            deleted = self.store.delete_pending([prompt_id])
        if deleted:
            self.hub.publish_status()
            return DELETED
        return FINISHED if self.store.get(prompt_id) is not None else UNKNOWN

    def interrupt(self, prompt_id: str | None = None) -> str | None:
        """Interrupt the running prompt (only if it is ``prompt_id``, when given); returns its id or None."""
        with self._lock:
            if self._current is None or (prompt_id is not None and prompt_id != self._current):
                return None
            self._request_interrupt()
            return self._current

    def _request_interrupt(self) -> None:
        self._cancel = True
        self.runtime.interrupt()

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        """Drop cached results and/or live models between prompts (ComfyUI's ``POST /free``)."""
        with self._lock:
            self._free["unload_models"] |= bool(unload_models)
            self._free["free_memory"] |= bool(free_memory)
        self.notify()

    def _apply_free(self) -> None:
        with self._lock:
            unload, free = self._free["unload_models"], self._free["free_memory"]
            self._free = {"unload_models": False, "free_memory": False}
        if free:
            self.runtime.cache.clear()
        if unload or free:
            for resource in list(self.runtime.resources.values()):
                clear = getattr(resource, "clear", None)
                if callable(clear):
                    clear()
            gc.collect()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._apply_free()
            with self._lock:
                item = self.store.claim_next()
                self._current = item.prompt_id if item else None
                self._cancel = False
            if item is None:
                self._wake.wait(timeout=5.0)
                continue
            self.hub.publish_status()
            try:
                self._run(item)
            except Exception:  # noqa: BLE001 - the worker must outlive any prompt
                log.exception("prompt %s: the worker failed to record its run", item.prompt_id)
                with self._lock:
                    self._current = None

    def _run(self, item: QueueItem) -> None:
        run = _Run(item, self.hub)

        def on_event(event: dict) -> None:
            if event["event"] == "execution_start":
                # A cancel that came after this prompt was claimed but before the runtime cleared its
                # interrupt flag (at the start of run) must still stop it.
                with self._lock:
                    if self._cancel:
                        self.runtime.interrupt()
            run.on_event(event)

        pnginfo = item.extra_data.get("extra_pnginfo")
        ui = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
        workflow = Workflow(item.prompt, ui if isinstance(ui, dict) else None, f"prompt {item.prompt_id}")
        status = ERROR
        sweep = item.extra_data.get(SWEEP_KEY)
        try:
            if sweep is not None:
                run.outputs = self._sweep(workflow, sweep, run, on_event)
                result = None
            else:
                result = self.runtime.run(workflow, prompt_id=item.prompt_id, outputs=item.outputs or None,
                                          on_event=on_event)
        except Interrupted:
            status = INTERRUPTED
            if run.terminal is None:
                run.terminal = ("execution_interrupted", {"node_id": "", "node_type": "", "executed": []})
        except ExecutionError as exc:
            if run.terminal is None:
                run.fail(exc, exc.node_id, exc.class_type)
        except ValidationError as exc:
            first = next(iter(exc.node_errors.items()), None)
            run.fail(exc, first[0] if first else "", first[1]["class_type"] if first else "")
        except Exception as exc:  # noqa: BLE001 - one failing prompt must not stop the worker
            log.exception("prompt %s failed outside its nodes", item.prompt_id)
            run.fail(exc)
        else:
            status = SUCCESS
            # Cached output nodes did not run: send their outputs so the page shows them again.
            for node_id in result.cached if result is not None else ():
                if node_id in result.outputs and node_id not in run.outputs:
                    run.on_event({"event": "executed", "node": node_id, "output": result.outputs[node_id]})
            if result is not None:
                run.outputs = dict(result.outputs)
        terminal_type, terminal_data = run.terminal or ("execution_success", {})
        terminal_data = {**terminal_data, "prompt_id": item.prompt_id, "timestamp": _now_ms()}
        with self._lock:
            self.store.finish(item.prompt_id, status, run.outputs, run.messages + [[terminal_type, terminal_data]])
            self._current = None
            self._cancel = False
        # Sent after the history holds the run, so a page that reloads its queue on them sees it finished.
        self.hub.publish(terminal_type, terminal_data, run.sid)
        self.hub.publish("executing", {"node": None, "display_node": None, "prompt_id": item.prompt_id}, run.sid)
        self.hub.publish_status()

    def _remote_executor(self):
        from ..sweep.driver import make_executor

        if self._remote is None:
            self._remote = make_executor(self.sweep_executor, self.runtime, self.ray_address)
        return self._remote

    def _sweep(self, workflow: Workflow, definition: dict, run: _Run, on_event) -> dict:
        """Run a queued sweep on this runtime (resuming one run before); its outputs for the history:
        ``{"sweep": {"images": grids, "cells": cell images, "manifest": [...], "failed": [indices]}}``."""
        from ..sweep.driver import default_out, run_sweep
        from ..sweep.executor import LocalExecutor
        from ..sweep.output import MANIFEST
        from ..sweep.spec import SweepSpec, plan

        def on_cell_event(event: dict) -> None:
            if event["event"] == "execution_start":
                if not run.started:
                    on_event(event)  # the sweep's start, once
                with self._lock:  # every cell: a cancel between two cells stops the next one
                    if self._cancel:
                        self.runtime.interrupt()
            elif event["event"] in SWEEP_EVENTS:
                run.on_event(event)

        planned = plan(self.runtime, workflow, SweepSpec.from_json(definition))
        out = default_out(self.runtime, planned)

        def ref(path) -> dict:
            rel = path.relative_to(self.runtime.folders.output_dir)
            return {"filename": rel.name, "subfolder": rel.parent.as_posix(), "type": "output"}

        def on_cell(record, done: int, total: int) -> None:
            run.send("sweep_cell", {"index": record.index, "done": done, "total": total,
                                             "status": record.status, "overrides": record.overrides,
                                             "images": [ref(out / f["path"]) for f in record.files],
                                             "error": record.error}, record=True)

        if self.sweep_executor == "local":
            executor = LocalExecutor(self.runtime, on_event=on_cell_event)
        else:  # the workers send no node events: the sweep's start, once, here
            on_event({"event": "execution_start"})
            executor = _KeptOpen(self._remote_executor())
        result = run_sweep(self.runtime, planned, out, executor=executor, on_cell=on_cell)
        return {"sweep": {"images": [ref(g) for g in result.grids],
                          "cells": [ref(out / f["path"]) for i in sorted(result.records)
                                    for f in result.records[i].files],
                          "manifest": [ref(out / MANIFEST)], "failed": result.failed}}


class _KeptOpen:
    """An executor lent to one sweep: the sweep's ``close()`` leaves it open (the server closes it
    when it stops), so its workers keep their warm models for the next sweep."""

    def __init__(self, executor):
        self.executor = executor

    def run(self, cells, job):
        return self.executor.run(cells, job)

    def interrupt(self) -> None:
        self.executor.interrupt()

    def close(self) -> None:
        pass
