"""context.py: the context a running node sees, carried in a ContextVar, with a default outside runs."""

import threading

import pytest

from loraloom.graph_runtime import Folders, Interrupted
from loraloom.graph_runtime.context import (ExecutionContext, current_context, reset_context,
                                            set_default_context, use_context)


def make(tmp_path, **kw):
    return ExecutionContext(folders=Folders(lora_dirs=[tmp_path]), **kw)


def test_outside_a_run_the_default_is_one_object():
    first = current_context()
    assert first is current_context() and first.node_id is None


def test_use_and_reset_nest(tmp_path):
    outside = current_context()
    outer, inner = make(tmp_path, node_id="1"), make(tmp_path, node_id="2")
    token_outer = use_context(outer)
    token_inner = use_context(inner)
    assert current_context() is inner
    reset_context(token_inner)
    assert current_context() is outer
    reset_context(token_outer)
    assert current_context() is outside


def test_another_thread_does_not_see_this_threads_context(tmp_path):
    ctx = make(tmp_path, node_id="7")
    token = use_context(ctx)
    try:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(current_context()))
        thread.start()
        thread.join()
        assert current_context() is ctx and seen[0] is not ctx
    finally:
        reset_context(token)


def test_progress_reports_then_honours_an_interrupt(tmp_path):
    seen = []
    ctx = make(tmp_path, node_id="4", on_progress=lambda *args: seen.append(args))
    ctx.progress(1, 3)
    ctx.interrupt_flag.set()
    with pytest.raises(Interrupted) as info:
        ctx.progress(2, 3)
    assert seen == [("4", 1, 3), ("4", 2, 3)], "the step is reported before the interrupt is raised"
    assert info.value.node_id == "4" and "at node 4" in str(info.value)


def test_check_interrupt_and_progress_without_a_listener(tmp_path):
    ctx = make(tmp_path)
    ctx.progress(1, 1)
    ctx.check_interrupt()
    ctx.interrupt_flag.set()
    with pytest.raises(Interrupted, match="^interrupted$"):
        ctx.check_interrupt()


def test_set_default_context_replaces_the_default_outside_runs(tmp_path):
    previous = current_context()
    mine = make(tmp_path, resources={"pool": object()})
    try:
        set_default_context(mine)
        assert current_context() is mine
        token = use_context(make(tmp_path))
        assert current_context() is not mine, "a running node's context wins over the default"
        reset_context(token)
    finally:
        set_default_context(previous)
    assert current_context() is previous
