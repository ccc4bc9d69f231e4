"""The caching executor, driven through real graphs of stub nodes (did / did_not lists)."""

import os
import threading

import pytest

from loraloom.graph_runtime import ExecutionError, Interrupted, Runtime


def diamond():
    """1 Const -> 2 Scale -> 4 Add <- 3 Scale <- 1 ; 4 -> 5 Show ; 2.label -> 6 ShowText."""
    return {
        "1": {"class_type": "Const", "inputs": {"value": 3}},
        "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 2.0}},
        "3": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": -1.0}},
        "4": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["3", 0]}},
        "5": {"class_type": "Show", "inputs": {"x": ["4", 0]}},
        "6": {"class_type": "ShowText", "inputs": {"text": ["2", 1]}},
    }


def run(rt, stubs, wf, **kw):
    stubs.calls.clear()
    result = rt.run(wf, **kw)
    assert sorted(stubs.calls) == sorted(result.executed), "result.executed must list exactly what ran"
    return result


def test_second_run_executes_nothing(stubs, tmp_path):
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    first = run(rt, stubs, diamond())
    assert sorted(first.executed) == ["1", "2", "3", "4", "5", "6"]
    assert first.outputs == {"5": {"value": [3]}, "6": {"text": ["x2.0"]}}
    second = run(rt, stubs, diamond())
    assert second.executed == [], f"nothing may re-run, but {second.executed} did"
    assert second.outputs == first.outputs, "cached output nodes still report their UI output"
    assert sorted(second.cached) == ["5", "6"], "the walk stops at cached outputs"


@pytest.mark.parametrize("node_id,widget,value,did", [
    ("3", "factor", 5.0, ["3", "4", "5"]),
    ("2", "factor", 3.0, ["2", "4", "5", "6"]),
    ("1", "value", 4, ["1", "2", "3", "4", "5", "6"]),
])
def test_widget_change_reruns_node_and_descendants_only(stubs, tmp_path, node_id, widget, value, did):
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    run(rt, stubs, diamond())
    result = run(rt, stubs, diamond(), overrides={f"{node_id}.{widget}": value})
    assert sorted(result.executed) == did, f"changing {node_id}.{widget} must re-run exactly {did}"
    did_not = sorted(set("123456") - set(did))
    assert not set(did_not) & set(result.executed), f"{did_not} must not re-run"


def test_same_value_again_hits_cache_after_change_back(stubs, tmp_path):
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    run(rt, stubs, diamond())
    run(rt, stubs, diamond(), overrides={"3.factor": 5.0})
    back = run(rt, stubs, diamond())
    assert back.executed == [], "both variants are cached: switching back costs nothing"


def test_only_nodes_an_output_needs_run(stubs, tmp_path):
    wf = diamond()
    wf["7"] = {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 9.0}}  # feeds no output
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    result = run(rt, stubs, wf)
    assert "7" not in result.executed, "a node no output needs must not run"


def test_muted_branch_does_not_run(stubs, tmp_path):
    ui = {
        "nodes": [
            {"id": 1, "type": "Const", "mode": 0, "inputs": [], "outputs": [{"name": "n", "type": "NUMBER", "links": [1, 2]}],
             "widgets_values": [2]},
            {"id": 2, "type": "Show", "mode": 0, "inputs": [{"name": "x", "type": "NUMBER", "link": 1}], "outputs": []},
            {"id": 3, "type": "Scale", "mode": 0, "inputs": [{"name": "x", "type": "NUMBER", "link": 2}],
             "outputs": [{"name": "y", "type": "NUMBER", "links": [3]}], "widgets_values": [2.0]},
            {"id": 4, "type": "Show", "mode": 2, "inputs": [{"name": "x", "type": "NUMBER", "link": 3}], "outputs": []},
        ],
        "links": [[1, 1, 0, 2, 0, "NUMBER"], [2, 1, 0, 3, 0, "NUMBER"], [3, 3, 0, 4, 0, "NUMBER"]],
        "version": 0.4,
    }
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    result = run(rt, stubs, ui)
    assert sorted(result.executed) == ["1", "2"], "node 3 feeds only the muted node 4: it must not run"


def test_editing_a_fingerprinted_file_reruns_its_node(stubs, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "a.txt").write_text("one")
    wf = {"1": {"class_type": "ReadText", "inputs": {"name": "a.txt"}},
          "2": {"class_type": "ShowText", "inputs": {"text": ["1", 0]}}}
    rt = Runtime(registry=stubs.registry, lora_dirs=[loras], output_dir=tmp_path)
    assert run(rt, stubs, wf).outputs["2"] == {"text": ["one"]}
    assert run(rt, stubs, wf).executed == []
    (loras / "a.txt").write_text("two!")
    st = (loras / "a.txt").stat()
    os.utime(loras / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    again = run(rt, stubs, wf)
    assert sorted(again.executed) == ["1", "2"], "a changed file must re-run its reader and descendants"
    assert again.outputs["2"] == {"text": ["two!"]}


def test_eviction_reruns_evicted_nodes_only(stubs, tmp_path):
    wf = {"1": {"class_type": "Const", "inputs": {"value": 1}},
          "2": {"class_type": "Blob", "inputs": {"x": ["1", 0], "kib": 64}},
          "3": {"class_type": "BlobLen", "inputs": {"blob": ["2", 0]}},
          "4": {"class_type": "Show", "inputs": {"x": ["3", 0]}},
          "5": {"class_type": "Blob", "inputs": {"x": ["1", 0], "kib": 64}}}
    wf2 = dict(wf)
    wf2["5"] = {"class_type": "Blob", "inputs": {"x": ["1", 0], "kib": 65}}
    wf2["6"] = {"class_type": "BlobLen", "inputs": {"blob": ["5", 0]}}
    wf2["7"] = {"class_type": "Show", "inputs": {"x": ["6", 0]}}
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path, cache_bytes=100 * 1024)
    run(rt, stubs, wf)
    second = run(rt, stubs, wf2)  # its 65 KiB blob pushes the 64 KiB one out of a 100 KiB budget
    assert sorted(second.executed) == ["5", "6", "7"]
    assert rt.cache.evictions >= 1, "the budget must have forced an eviction"
    assert rt.cache.nbytes <= 100 * 1024, f"store holds {rt.cache.nbytes} bytes, above its budget"
    third = run(rt, stubs, wf)
    assert third.executed == [], "node 4 is still cached: its evicted ancestor 2 is not needed"
    wf["9"] = {"class_type": "BlobLen", "inputs": {"blob": ["2", 0], "offset": 1}}
    wf["10"] = {"class_type": "Add", "inputs": {"a": ["9", 0], "b": ["3", 0]}}
    wf["11"] = {"class_type": "Show", "inputs": {"x": ["10", 0]}}
    fourth = run(rt, stubs, wf)
    assert sorted(fourth.executed) == ["10", "11", "2", "9"], \
        "the evicted blob 2 is needed again and re-runs; 1 and 3 stay cached"


def test_failing_node_keeps_good_results_and_next_run_works(stubs, tmp_path):
    wf = {"1": {"class_type": "Const", "inputs": {"value": 5}},
          "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 2.0}},
          "3": {"class_type": "MaybeFail", "inputs": {"x": ["2", 0], "fail": True}},
          "4": {"class_type": "Show", "inputs": {"x": ["3", 0]}}}
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    events = []
    with pytest.raises(ExecutionError) as info:
        rt.run(wf, on_event=events.append)
    err = info.value
    assert (err.node_id, err.class_type) == ("3", "MaybeFail")
    assert "asked to fail" in str(err) and "node 3 (MaybeFail)" in str(err)
    assert err.inputs["fail"] == "True", "the error carries the node's current inputs"
    assert events[-1]["event"] == "execution_error" and events[-1]["node"] == "3"
    fixed = run(rt, stubs, wf, overrides={"3.fail": False})
    assert sorted(fixed.executed) == ["3", "4"], "1 and 2 ran fine before and must stay cached"
    assert fixed.outputs["4"] == {"value": [10.0]}


def test_not_idempotent_node_runs_every_time(stubs, tmp_path):
    wf = {"1": {"class_type": "Const", "inputs": {"value": 5}},
          "2": {"class_type": "Volatile", "inputs": {"x": ["1", 0]}},
          "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}}}
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    run(rt, stubs, wf)
    again = run(rt, stubs, wf)
    assert sorted(again.executed) == ["2", "3"], "a not-idempotent node and its descendants run each time"


def test_events_in_order_with_progress(stubs, tmp_path):
    wf = {"1": {"class_type": "Const", "inputs": {"value": 5}},
          "2": {"class_type": "Slow", "inputs": {"x": ["1", 0], "steps": 3}},
          "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}}}
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    events = []
    rt.run(wf, on_event=events.append)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "execution_start" and kinds[-1] == "execution_success"
    progress = [(e["value"], e["max"]) for e in events if e["event"] == "progress"]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    executed = [e["node"] for e in events if e["event"] == "executed"]
    assert executed == ["1", "2", "3"], "executed events follow topological order"
    assert len({e["prompt_id"] for e in events}) == 1
    events.clear()
    rt.run(wf, on_event=events.append)
    assert [e for e in events if e["event"] == "execution_cached"][0]["nodes"] == ["3"]


def test_interrupt_between_steps_then_next_run_works(stubs, tmp_path):
    wf = {"1": {"class_type": "Const", "inputs": {"value": 5}},
          "2": {"class_type": "Slow", "inputs": {"x": ["1", 0], "steps": 5000}},
          "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}}}
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)

    def on_event(event):
        if event["event"] == "progress" and event["value"] == 10:
            threading.Thread(target=rt.interrupt).start()

    with pytest.raises(Interrupted) as info:
        rt.run(wf, on_event=on_event)
    assert info.value.node_id == "2"
    result = run(rt, stubs, wf, overrides={"2.steps": 2})
    assert sorted(result.executed) == ["2", "3"], "node 1 finished before the interrupt and stays cached"


def test_custom_node_registered_without_editing_package(stubs, tmp_path):
    from loraloom.graph_runtime import Int, Output, node

    @node(category="mine", inputs=[Int("n", 2)], outputs=[Output("NUMBER")])
    class Double:
        def execute(self, n):
            return (2 * n,)

    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    rt.register(Double)
    result = rt.run({"1": {"class_type": "Double", "inputs": {"n": 21}},
                     "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}}})
    assert result.outputs["2"] == {"value": [42]}


def test_wrong_return_shape_is_named(stubs, tmp_path):
    from loraloom.graph_runtime import Output, node

    @node(category="mine", outputs=[Output("NUMBER"), Output("NUMBER")])
    class Bad:
        def execute(self):
            return (1,)

    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    rt.register(Bad)
    with pytest.raises(ExecutionError, match=r"node 1 \(Bad\).*expected a tuple of 2"):
        rt.run({"1": {"class_type": "Bad", "inputs": {}}, "2": {"class_type": "Show", "inputs": {"x": ["1", 1]}}})


def test_long_chain_runs_without_recursion(stubs, tmp_path):
    rt = Runtime(registry=stubs.registry, output_dir=tmp_path)
    result = run(rt, stubs, stubs.chain(3000))
    assert result.outputs["2999"] == {"value": [1]}
    assert run(rt, stubs, stubs.chain(3000)).executed == []


def test_a_lazy_link_runs_nothing_upstream_and_a_node_may_run_it_nested(stubs, tmp_path):
    """A node with a lazy input gets the link, not its value, and nothing upstream runs for it; it may
    run that part itself with its runtime's run(): nested in the current run (no deadlock on the run
    lock), on the same cache, its events only for whoever asked."""
    from loraloom.graph_runtime import Link, Output, current_context, node

    @node(category="test", inputs=[Link("x", "NUMBER", lazy=True)], outputs=[Output("NUMBER")], output_node=True)
    class Twice:
        def execute(self, x):
            ctx = current_context()
            upstream = {nid: n for nid, n in ctx.prompt.items() if nid in ("1", "2")}
            upstream["show"] = {"class_type": "Show", "inputs": {"x": list(x)}}  # a prompt has an output
            seen = []
            values = [ctx.runtime.run(upstream, {"2.factor": f}, outputs=[x[0]], on_event=seen.append).value(x[0])
                      for f in (2.0, 3.0)]
            assert any(e["event"] == "executing" for e in seen)
            return {"ui": {"link": [list(x)]}, "result": (sum(values),)}

    rt = Runtime(registry=stubs.registry, nodes=[Twice], output_dir=tmp_path)
    events = []
    rt.add_listener(events.append)
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 3}},
              "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 1.0}},
              "3": {"class_type": "Twice", "inputs": {"x": ["2", 0]}}}
    stubs.calls.clear()
    result = rt.run(prompt)
    assert result.executed == ["3"], "the lazy link's upstream did not run for node 3"
    assert result.outputs["3"] == {"link": [["2", 0]]} and result.value("3") == 15.0
    assert stubs.calls.count("1") == 1 and stubs.calls.count("2") == 2, "the nested runs shared the cache"
    assert [e["node"] for e in events if e["event"] == "executing"] == ["3"], "listeners hear the outer run only"
    again = rt.run({**prompt, "1": {"class_type": "Const", "inputs": {"value": 4}}})
    assert "3" in again.executed, "the lazy link's upstream still joins node 3's cache key"
