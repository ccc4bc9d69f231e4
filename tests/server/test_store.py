"""The persistent prompt queue and history on the PromptStore itself: order (ComfyUI's numbers, front
first), ids used once, status moves, deleting, a bounded history, and a restart."""

import pytest

from loraloom.server.store import ERROR, INTERRUPTED, PENDING, RUNNING, SUCCESS, DuplicateId, PromptStore


@pytest.fixture
def store(tmp_path):
    store = PromptStore(tmp_path / "q.sqlite3")
    yield store
    store.close()


def ids(items) -> list[str]:
    return [i.prompt_id for i in items]


def test_prompts_run_in_number_order_and_front_goes_first(store):
    numbers = [store.add(f"p{i}", {"n": i}, {"client_id": "c"}, ["5"]) for i in range(3)]
    assert numbers == [0, 1, 2]
    assert store.add("urgent", {}, {}, [], front=True) == -3, "ComfyUI's negative number: ahead of every pending"
    assert store.add("more-urgent", {}, {}, [], front=True) == -4, "the latest front prompt goes first"
    running, pending = store.queue()
    assert running == [] and ids(pending) == ["more-urgent", "urgent", "p0", "p1", "p2"]
    first = store.claim_next()
    assert (first.prompt_id, first.status) == ("more-urgent", RUNNING)
    assert store.get("more-urgent").status == RUNNING
    running, pending = store.queue()
    assert ids(running) == ["more-urgent"] and ids(pending) == ["urgent", "p0", "p1", "p2"]
    assert store.remaining() == 5
    item = store.get("p1")
    assert item.as_tuple() == [1, "p1", {"n": 1}, {"client_id": "c"}, ["5"]], "ComfyUI's queue tuple"


def test_an_id_is_used_once_and_a_refused_add_takes_no_number(store):
    store.add("a", {}, {}, [])
    with pytest.raises(DuplicateId, match="'a'"):
        store.add("a", {}, {}, [])
    store.finish(store.claim_next().prompt_id, SUCCESS, {}, [])
    with pytest.raises(DuplicateId):
        store.add("a", {}, {}, [])
    assert store.add("b", {}, {}, []) == 1, "the refused adds rolled back, numbers stay consecutive"


def test_finish_records_the_run_and_refuses_a_status_that_is_not_an_end(store):
    store.add("p", {}, {}, [])
    store.claim_next()
    with pytest.raises(ValueError, match="'running'"):
        store.finish("p", RUNNING, {}, [])
    assert store.get("p").status == RUNNING and store.get("p").result is None
    store.finish("p", ERROR, {"5": {"value": [object()]}}, [["execution_error", {"node_id": "4"}]])
    item = store.get("p")
    assert item.status == ERROR and item.messages == [["execution_error", {"node_id": "4"}]]
    assert isinstance(item.result["5"]["value"][0], str), "a value JSON cannot hold is stored as its text"
    assert store.claim_next() is None and store.remaining() == 0


def test_deleting_touches_only_its_own_kind(store):
    for name in ("done", "running", "waiting-1", "waiting-2"):
        store.add(name, {}, {}, [])
    store.finish(store.claim_next().prompt_id, SUCCESS, {}, [])
    store.claim_next()
    assert store.delete_pending(["running", "done", "waiting-1", "unknown"]) == ["waiting-1"], \
        "only pending prompts leave the queue"
    assert store.delete_history(["running", "waiting-2", "done"]) == ["done"], "only finished ones leave history"
    assert store.get("running").status == RUNNING and store.get("waiting-2").status == PENDING
    store.add("waiting-3", {}, {}, [])
    assert sorted(store.delete_pending()) == ["waiting-2", "waiting-3"], "None means every pending prompt"
    assert store.delete_history() == [] and ids(store.queue()[0]) == ["running"]


def test_a_restart_keeps_the_queue_and_ends_the_running_prompt_as_interrupted(tmp_path):
    path = tmp_path / "q.sqlite3"
    store = PromptStore(path)
    for name in ("crashed", "waiting"):
        store.add(name, {}, {}, [])
    store.claim_next()
    store.close()
    again = PromptStore(path)
    try:
        assert again.recover() == ["crashed"]
        crashed = again.get("crashed")
        assert crashed.status == INTERRUPTED and crashed.result == {}
        kind, data = crashed.messages[0]
        assert kind == "execution_interrupted" and data["prompt_id"] == "crashed" and "server stopped" in data["reason"]
        assert ids(again.queue()[1]) == ["waiting"] and again.recover() == [], "nothing else was running"
        assert again.add("new", {}, {}, []) == 2, "numbers keep counting after a restart"
    finally:
        again.close()


def test_store_history_is_bounded_and_ordered(tmp_path, monkeypatch):
    import loraloom.server.store as store_module

    monkeypatch.setattr(store_module, "MAX_HISTORY", 3)
    store = PromptStore(tmp_path / "q.sqlite3")
    for i in range(5):
        store.add(f"p{i}", {}, {}, [])
        item = store.claim_next()
        store.finish(item.prompt_id, store_module.SUCCESS, {}, [])
    assert [i.prompt_id for i in store.history()] == ["p2", "p3", "p4"]
    assert [i.prompt_id for i in store.history(max_items=2)] == ["p3", "p4"]
    assert store.get("p0") is None
    store.close()
