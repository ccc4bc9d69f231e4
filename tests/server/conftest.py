"""Fixtures for the server tests: stub nodes, a Runtime over them, and an aiohttp test client.

Tests are ``async def`` functions run by the small hook below (no asyncio plugin needed). Each gets
``serve(...)``: an async context manager yielding a :class:`Server` (the aiohttp test client, the
app's state, and helpers for posting prompts and waiting on them).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
import types

import pytest

pytest.importorskip("aiohttp", reason="the server needs the editor extra: pip install 'loraloom[editor]'")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from loraloom.graph_runtime import (Boolean, Int, Link, Output, Runtime, String, current_context,  # noqa: E402
                                    node)
from loraloom.nodes.image import PreviewImage, SaveImage  # noqa: E402
from loraloom.server import STATE, ServerConfig, create_app  # noqa: E402

GATES: dict[str, threading.Event] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run ``async def`` tests of this folder in a fresh event loop."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        names = pyfuncitem._fixtureinfo.argnames
        asyncio.run(asyncio.wait_for(pyfuncitem.obj(**{n: pyfuncitem.funcargs[n] for n in names}), timeout=120))
        return True
    return None


@node(category="test", inputs=[Int("value", 1, min=-1000, max=1000)], outputs=[Output("NUMBER", "n")])
class Const:
    def execute(self, value):
        return (value,)


@node(category="test", inputs=[Link("x", "NUMBER"), String("gate", "g")], outputs=[Output("NUMBER")],
      not_idempotent=True)
class Gate:
    """Waits until the test opens ``GATES[gate]`` (or the run is interrupted)."""

    def execute(self, x, gate):
        ctx = current_context()
        event = GATES.setdefault(gate, threading.Event())
        while not event.wait(0.005):
            ctx.check_interrupt()
        return (x,)


@node(category="test", inputs=[Link("x", "NUMBER"), Int("steps", 3, min=1, max=10000)], outputs=[Output("NUMBER")])
class Steps:
    def execute(self, x, steps):
        ctx = current_context()
        for i in range(steps):
            time.sleep(0.001)
            ctx.progress(i + 1, steps)
        return (x,)


@node(category="test", inputs=[Link("x", "NUMBER"), Boolean("fail", False)], outputs=[Output("NUMBER")])
class MaybeFail:
    def execute(self, x, fail):
        if fail:
            raise RuntimeError("asked to fail")
        return (x,)


@node(category="test", inputs=[Link("x", "NUMBER"), String("text", "")], outputs=[], output_node=True)
class Show:
    def execute(self, x, text):
        return {"ui": {"value": [x], "text": [text]}}


@node(category="test", inputs=[Link("x", "NUMBER")], outputs=[Output("IMAGE", "image")])
class Solid:
    """An 8x8 grey image (ComfyUI's IMAGE: [B, H, W, C] in 0..1)."""

    def execute(self, x):
        import torch

        return (torch.full((1, 8, 8, 3), (x % 10) / 10.0),)


STUBS = [Const, Gate, Steps, MaybeFail, Show, Solid, SaveImage, PreviewImage]


def chain(value: int = 1, *, gate: str | None = None, steps: int = 3, fail: bool = False, text: str = "") -> dict:
    """Const -> [Gate] -> Steps -> MaybeFail -> Show."""
    prompt = {"1": {"class_type": "Const", "inputs": {"value": value}},
              "3": {"class_type": "Steps", "inputs": {"x": ["2" if gate else "1", 0], "steps": steps}},
              "4": {"class_type": "MaybeFail", "inputs": {"x": ["3", 0], "fail": fail}},
              "5": {"class_type": "Show", "inputs": {"x": ["4", 0], "text": text}}}
    if gate:
        prompt["2"] = {"class_type": "Gate", "inputs": {"x": ["1", 0], "gate": gate}}
    return prompt


def image_prompt(value: int = 3, prefix: str = "test") -> dict:
    return {"1": {"class_type": "Const", "inputs": {"value": value}},
            "2": {"class_type": "Solid", "inputs": {"x": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


class Server:
    """A running test server: ``client`` (aiohttp TestClient), ``state``, ``started`` (prompt ids
    in the order the runtime started them), and helpers."""

    def __init__(self, client: TestClient, rt: Runtime, started: list[str]):
        self.client = client
        self.rt = rt
        self.state = client.server.app[STATE]
        self.started = started

    @property
    def origin(self) -> str:
        return f"http://{self.client.host}:{self.client.port}"

    async def submit(self, prompt: dict, expect: int = 200, **body) -> dict:
        resp = await self.client.post("/api/prompt", json={"prompt": prompt, **body})
        data = await resp.json()
        assert resp.status == expect, f"POST /api/prompt answered {resp.status}: {data}"
        return data

    async def wait_done(self, prompt_id: str, timeout: float = 30.0) -> dict:
        """The history entry of ``prompt_id`` once it finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = await self.client.get(f"/api/history/{prompt_id}")
            assert resp.status == 200, f"history of {prompt_id}: {resp.status}"
            data = await resp.json()
            if prompt_id in data:
                return data[prompt_id]
            await asyncio.sleep(0.01)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")

    async def wait_running(self, prompt_id: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state.worker.running_id != prompt_id or prompt_id not in self.started:
            assert time.monotonic() < deadline, f"prompt {prompt_id} never started running"
            await asyncio.sleep(0.005)


@pytest.fixture
def gates():
    """``gates("name")``: the event a Gate node with ``gate="name"`` waits on (set it to let it pass)."""
    GATES.clear()
    yield lambda name: GATES.setdefault(name, threading.Event())
    for event in GATES.values():
        event.set()


@pytest.fixture
def make_runtime(tmp_path):
    def make(cls=Runtime) -> Runtime:
        return cls(nodes=STUBS, output_dir=tmp_path / "output", lora_dirs=[tmp_path / "loras"],
                   models_dir=tmp_path / "models")
    return make


@pytest.fixture
def frontend(tmp_path):
    """A stand-in for the frontend wheel's static folder."""
    root = tmp_path / "frontend"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>editor</title>")
    (root / "assets" / "index.js").write_text("console.log('hi')")
    return root


@pytest.fixture
def serve(tmp_path, make_runtime, frontend, gates):
    """``async with serve(**config) as server:`` a server over the stub runtime (``runtime=`` to pass one)."""

    @contextlib.asynccontextmanager
    async def start(runtime: Runtime | None = None, **config):
        rt = runtime or make_runtime()
        started: list[str] = []  # listening before the worker starts: it may run a recovered queue at once
        rt.add_listener(lambda e: started.append(e["prompt_id"]) if e["event"] == "execution_start" else None)
        config.setdefault("user_dir", tmp_path / "user")
        config.setdefault("frontend_dir", frontend)
        app = create_app(rt, ServerConfig(**config))
        async with TestClient(TestServer(app)) as client:
            yield Server(client, rt, started)

    return start


@pytest.fixture
def helpers():
    return types.SimpleNamespace(chain=chain, image_prompt=image_prompt, gates=GATES)
