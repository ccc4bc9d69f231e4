"""Stub nodes for the torch-free runtime tests. Each records its node id in ``calls`` when it runs."""

import threading
import time
import types

import pytest

from loraloom.graph_runtime import (Boolean, Combo, Float, Int, Link, NodeRegistry, Output, String,
                                    current_context, node)

calls: list[str] = []


def _ran():
    calls.append(current_context().node_id)


@node(category="test", inputs=[Int("value", 1, min=-1000, max=1000)], outputs=[Output("NUMBER", "n")])
class Const:
    def execute(self, value):
        _ran()
        return (value,)


@node(category="test", inputs=[Link("a", "NUMBER"), Link("b", "NUMBER", optional=True)],
      outputs=[Output("NUMBER", "sum")])
class Add:
    def execute(self, a, b=0):
        _ran()
        return (a + b,)


@node(category="test", inputs=[Link("x", "NUMBER"), Float("factor", 1.0, min=-10.0, max=10.0)],
      outputs=[Output("NUMBER", "y"), Output("TEXT", "label")])
class Scale:
    def execute(self, x, factor):
        _ran()
        return (x * factor, f"x{factor}")


@node(category="test", inputs=[Link("x", "NUMBER")], outputs=[], output_node=True)
class Show:
    def execute(self, x):
        _ran()
        return {"ui": {"value": [x]}}


@node(category="test", inputs=[Link("text", "TEXT")], outputs=[], output_node=True)
class ShowText:
    def execute(self, text):
        _ran()
        return {"ui": {"text": [text]}}


@node(category="test", inputs=[Link("x", "NUMBER"), Boolean("fail", False)], outputs=[Output("NUMBER")])
class MaybeFail:
    def execute(self, x, fail):
        _ran()
        if fail:
            raise RuntimeError("asked to fail")
        return (x,)


@node(category="test", inputs=[String("name", "a.txt", file_kind="loras")], outputs=[Output("TEXT")])
class ReadText:
    def execute(self, name):
        _ran()
        return (current_context().folders.find("loras", name).read_text(),)


@node(category="test", inputs=[Link("x", "NUMBER")], outputs=[Output("NUMBER")], not_idempotent=True)
class Volatile:
    def execute(self, x):
        _ran()
        return (x,)


@node(category="test", inputs=[Combo("mode", ["add", "mul"], "add"), Int("seed", 0, min=0, max=2**32),
                               Int("steps", 4, min=1, max=100)], outputs=[Output("NUMBER")])
class Seeded:
    def execute(self, mode, seed, steps):
        _ran()
        return (seed + steps if mode == "add" else seed * steps,)


@node(category="test", inputs=[Link("x", "NUMBER"), Int("steps", 5, min=1, max=10000)],
      outputs=[Output("NUMBER")])
class Slow:
    def execute(self, x, steps):
        _ran()
        ctx = current_context()
        for i in range(steps):
            time.sleep(0.001)
            ctx.progress(i + 1, steps)
        return (x,)


@node(category="test", inputs=[Link("x", "NUMBER"), Int("kib", 1, min=0, max=1 << 20)],
      outputs=[Output("BLOB")])
class Blob:
    def execute(self, x, kib):
        _ran()
        return (bytes(kib * 1024),)


@node(category="test", inputs=[Link("blob", "BLOB"), Int("offset", 0)], outputs=[Output("NUMBER")])
class BlobLen:
    def execute(self, blob, offset):
        _ran()
        return (len(blob) + offset,)


STUBS = [Const, Add, Scale, Show, ShowText, MaybeFail, ReadText, Volatile, Seeded, Slow, Blob, BlobLen]


@pytest.fixture
def stubs():
    """A registry of stub nodes and the list of node ids that ran (cleared per test)."""
    calls.clear()
    return types.SimpleNamespace(registry=NodeRegistry(STUBS), calls=calls, chain=chain,
                                 classes={c.__name__: c for c in STUBS})


def chain(n: int) -> dict:
    """An API workflow: Const -> Add x (n-2) -> Show."""
    wf = {"0": {"class_type": "Const", "inputs": {"value": 1}}}
    for i in range(1, n - 1):
        wf[str(i)] = {"class_type": "Add", "inputs": {"a": [str(i - 1), 0]}}
    wf[str(n - 1)] = {"class_type": "Show", "inputs": {"x": [str(n - 2), 0]}}
    return wf


def _ends_quickly(fn, seconds: float = 10.0):
    """What ``fn`` raised (None if nothing), run in a thread; fails if it has not ended in time
    (a FIFO opened for reading blocks until a writer comes; /dev/zero never ends)."""
    outcome = []

    def target():
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: it hangs"
    return outcome[0]


@pytest.fixture
def ends_quickly():
    """``ends_quickly(fn, seconds=10)``: run ``fn`` in a thread, fail if it hangs, return what it raised."""
    return _ends_quickly
