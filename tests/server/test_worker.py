"""The worker thread over a real Runtime and PromptStore: what it records and tells the page for each
way a run ends, cancelling (atomic with taking the next prompt), freeing memory, and stopping."""

import asyncio
import random
import threading
import time

import pytest

from loraloom.graph_runtime import Runtime
from loraloom.server.hub import Hub
from loraloom.server.store import ERROR, FINISHED, INTERRUPTED, SUCCESS, PromptStore
from loraloom.server.worker import Worker


class RecordingHub(Hub):
    """A hub that keeps what it was asked to publish, with the prompt's store status at that moment."""

    def __init__(self, store: PromptStore):
        super().__init__(status=lambda: {"exec_info": {"queue_remaining": store.remaining()}}, features={})
        self.store = store
        self.sent: list[tuple[str, dict, str | None, str | None]] = []

    def publish(self, type_, data, sid=None):
        item = self.store.get(data["prompt_id"]) if "prompt_id" in data else None
        self.sent.append((type_, data, sid, item.status if item else None))

    def of(self, prompt_id: str) -> list[tuple[str, dict, str | None, str | None]]:
        return [s for s in self.sent if s[1].get("prompt_id") == prompt_id]


class Bench:
    """A started worker with its store and recording hub; ``queue`` adds a prompt and wakes it."""

    def __init__(self, runtime: Runtime, path):
        self.runtime = runtime
        self.store = PromptStore(path)
        self.hub = RecordingHub(self.store)
        self.worker = Worker(runtime, self.store, self.hub)
        self.worker.start()

    def queue(self, prompt_id: str, prompt: dict, client_id: str | None = "page") -> str:
        self.store.add(prompt_id, prompt, {"client_id": client_id}, [])
        self.worker.notify()
        return prompt_id

    def wait(self, prompt_id: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while (item := self.store.get(prompt_id)) is None or item.status not in FINISHED:
            assert time.monotonic() < deadline, f"{prompt_id} did not finish"
            time.sleep(0.005)
        return item

    def wait_running(self, prompt_id: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.worker.running_id != prompt_id:
            assert time.monotonic() < deadline, f"{prompt_id} never started"
            time.sleep(0.005)


@pytest.fixture
def bench(make_runtime, tmp_path, gates):
    """``bench(runtime=None)``: a worker over the stub runtime, stopped after the test."""
    benches = []

    def start(runtime: Runtime | None = None) -> Bench:
        benches.append(Bench(runtime or make_runtime(), tmp_path / f"queue{len(benches)}.sqlite3"))
        return benches[-1]

    yield start
    for b in benches:
        b.worker.stop()
        b.store.close()


def test_the_history_holds_a_run_before_the_page_hears_it_ended(bench, helpers):
    b = bench()
    item = b.wait(b.queue("p1", helpers.chain(steps=2)))
    assert item.status == SUCCESS and item.result["5"] == {"value": [1], "text": [""]}
    assert [m[0] for m in item.messages] == ["execution_start", "execution_success"]
    assert all(m[1]["prompt_id"] == "p1" and isinstance(m[1]["timestamp"], int) for m in item.messages)
    sent = b.hub.of("p1")
    assert {sid for _, _, sid, _ in sent} == {"page"}, "a run's messages go to the client that queued it"
    kinds = [(t, d.get("node")) for t, d, _, _ in sent if t != "progress"]
    assert kinds == [("execution_start", None), ("executing", "1"), ("executing", "3"), ("executing", "4"),
                     ("executing", "5"), ("executed", "5"), ("execution_success", None), ("executing", None)], kinds
    ends = [status for t, d, _, status in sent if t == "execution_success" or (t == "executing" and d["node"] is None)]
    assert ends == [SUCCESS, SUCCESS], "a page that reloads on these must find the run finished"
    assert b.hub.sent[-1][0] == "status" and b.hub.sent[-1][2] is None, "then everyone hears the queue changed"


def test_a_prompt_that_no_longer_validates_is_an_error_naming_its_node(bench, helpers):
    b = bench()
    bad = helpers.chain()
    bad["1"]["inputs"]["value"] = 5000  # accepted earlier, but the runtime now refuses it
    item = b.wait(b.queue("bad", bad))
    assert item.status == ERROR
    assert [m[0] for m in item.messages] == ["execution_start", "execution_error"], \
        "the page gets a start before the error, as for any run"
    error = item.messages[-1][1]
    assert (error["node_id"], error["node_type"], error["traceback"]) == ("1", "Const", [])
    assert "1000" in error["exception_message"] and error["exception_type"].endswith("ValidationError")
    assert (error["extra_info"]["type"], error["extra_info"]["kind"]) == ("loraloom.ValidationError", "invalid_prompt")
    assert b.wait(b.queue("next", helpers.chain())).status == SUCCESS, "the worker goes on"


class _BrokenRuntime(Runtime):
    """A runtime that fails outside any node for prompts whose id starts with 'broken'."""

    def run(self, *args, **kwargs):
        if kwargs.get("prompt_id", "").startswith("broken"):
            raise RuntimeError("the runtime itself broke")
        return super().run(*args, **kwargs)


def test_a_failure_outside_the_nodes_is_recorded_and_the_worker_goes_on(bench, helpers, make_runtime):
    b = bench(make_runtime(_BrokenRuntime))
    item = b.wait(b.queue("broken-1", helpers.chain()))
    assert item.status == ERROR
    error = dict(item.messages[-1][1])
    assert item.messages[-1][0] == "execution_error" and (error["node_id"], error["node_type"]) == ("", "")
    assert error["exception_type"] == "builtins.RuntimeError"
    assert error["exception_message"] == "RuntimeError: the runtime itself broke"
    assert error["extra_info"] == {}, "not one of ours: no fields"
    assert any("the runtime itself broke" in line for line in error["traceback"]), "the traceback is kept"
    assert b.wait(b.queue("fine", helpers.chain())).status == SUCCESS
    assert b.worker.running_id is None


def test_cancel_answers_and_an_interrupted_run_names_its_node(bench, helpers, gates):
    b = bench()
    running = b.queue("running", helpers.chain(gate="w"))
    b.wait_running(running)
    pending = b.queue("pending", helpers.chain(2))
    assert b.worker.interrupt("pending") is None, "only the running prompt can be interrupted"
    status_before = sum(t == "status" for t, *_ in b.hub.sent)
    assert b.worker.cancel(pending) == "deleted" and b.store.get(pending) is None
    assert sum(t == "status" for t, *_ in b.hub.sent) == status_before + 1, "the queue's change is announced"
    assert b.worker.cancel("never-queued") == "unknown"
    assert b.worker.cancel(running) == "interrupting"
    item = b.wait(running)
    assert item.status == INTERRUPTED
    end = item.messages[-1]
    assert end[0] == "execution_interrupted" and (end[1]["node_id"], end[1]["node_type"]) == ("2", "Gate"), end
    assert end[1]["executed"] == ["1"]
    assert b.worker.cancel(running) == "finished", "a finished prompt is not cancelled again"


class _Pool:
    """A resource that can be cleared, like the model pool."""

    def __init__(self):
        self.cleared = 0

    def clear(self):
        self.cleared += 1


def test_free_unloads_models_and_free_memory_also_empties_the_cache(bench, helpers, make_runtime):
    rt = make_runtime()
    pool = _Pool()
    rt.resources.update({"pool": pool, "config": {"clear": "not callable"}})
    b = bench(rt)
    b.wait(b.queue("p", helpers.chain()))
    cached = len(rt.cache)
    assert cached > 0
    b.worker.request_free(unload_models=True, free_memory=False)
    deadline = time.monotonic() + 10
    while pool.cleared == 0:
        assert time.monotonic() < deadline, "unload_models must clear the live models"
        time.sleep(0.005)
    assert len(rt.cache) == cached, "unloading models keeps the cached results"
    b.worker.request_free(unload_models=False, free_memory=True)
    while pool.cleared == 1 or len(rt.cache):
        assert time.monotonic() < deadline, "free_memory clears the results and the live models"
        time.sleep(0.005)
    assert b.wait(b.queue("after", helpers.chain())).status == SUCCESS


def test_stop_interrupts_the_running_prompt_and_ends_the_thread(bench, helpers, gates):
    b = bench()
    b.wait_running(b.queue("long", helpers.chain(gate="stop")))
    b.worker.stop(timeout=10)
    assert not b.worker._thread.is_alive(), "the worker thread ended"
    assert b.store.get("long").status == INTERRUPTED


async def test_cancels_racing_the_worker_never_reach_the_next_prompt(serve, helpers):
    """Cancel each prompt over and over while the worker finishes it and takes the next: every
    prompt still succeeds (none was running when its own cancel was accepted, or it is interrupted)."""
    async with serve() as server:
        ids = [(await server.submit(helpers.chain(i, steps=15)))["prompt_id"] for i in range(12)]
        finished = set()
        stop = threading.Event()

        def hammer():  # cancels prompts that already finished, from another thread, as fast as it can
            while not stop.is_set():
                for prompt_id in list(finished):
                    server.state.worker.cancel(prompt_id)
                    server.state.worker.interrupt(prompt_id)

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            for prompt_id in ids:
                entry = await server.wait_done(prompt_id)
                finished.add(prompt_id)
                assert entry["status"]["status_str"] == "success", f"{prompt_id} was hit by another's cancel"
        finally:
            stop.set()
            thread.join()


async def test_every_cancel_answer_is_true_at_the_moment_it_is_given(serve, helpers):
    """Cancel the head of the queue at random moments, racing the worker that claims it. 'deleted'
    means it never runs; 'interrupting' that it was running; 'finished' that the history held it."""
    from loraloom.server.store import FINISHED

    async with serve() as server:
        ids = [(await server.submit(helpers.chain(i, steps=2)))["prompt_id"] for i in range(60)]
        answers, lies = {}, []
        worker, store = server.state.worker, server.state.store

        def canceller():
            rng = random.Random(0)
            while True:
                running, pending = store.queue()
                if not pending:
                    return
                head = pending[0].prompt_id
                time.sleep(rng.random() * 0.003)
                answer = worker.cancel(head)
                status = store.get(head).status if store.get(head) else None
                if answer == "finished" and status not in FINISHED:
                    lies.append((head, answer, status))
                answers[head] = answer

        await asyncio.to_thread(canceller)
        assert not lies, f"cancel answered 'finished' for prompts that were not: {lies}"
        for prompt_id in ids:
            if answers.get(prompt_id) == "deleted":
                assert prompt_id not in server.started, f"{prompt_id} was deleted yet ran"
                assert (await server.client.get(f"/api/history/{prompt_id}")).status == 404
            else:
                await server.wait_done(prompt_id)
        assert len(set(answers.values())) >= 2, f"the race was not exercised: {answers}"


class _SlowStart(Runtime):
    """A runtime that pauses between the worker claiming a prompt and the run clearing its interrupt
    flag: the window where a cancel used to be lost."""

    entered = threading.Event()
    proceed = threading.Event()

    def run(self, *args, **kwargs):
        if kwargs.get("prompt_id", "").startswith("slow"):
            self.entered.set()
            self.proceed.wait(10)
        return super().run(*args, **kwargs)


async def test_a_cancel_between_claim_and_run_start_is_kept(serve, helpers, make_runtime):
    _SlowStart.entered.clear(), _SlowStart.proceed.clear()
    async with serve(runtime=make_runtime(_SlowStart)) as server:
        await server.submit(helpers.chain(1), prompt_id="slow-1")
        after = (await server.submit(helpers.chain(2)))["prompt_id"]
        assert await asyncio.to_thread(_SlowStart.entered.wait, 10)
        resp = await server.client.post("/api/jobs/slow-1/cancel", json={})
        assert (await resp.json())["result"] == "interrupting"
        _SlowStart.proceed.set()
        entry = await server.wait_done("slow-1")
        assert entry["status"]["messages"][-1][0] == "execution_interrupted", "the early cancel was lost"
        assert (await server.wait_done(after))["status"]["status_str"] == "success"
