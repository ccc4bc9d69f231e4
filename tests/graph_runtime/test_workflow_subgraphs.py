"""workflow.py: the 1.0 schema and subgraphs, on graphs written by hand the way the editor saves them
(the editor-made files and the prompts it queued for them are in tests/workflows/test_editor_made.py)."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraloom.graph_runtime import LoomError, Runtime, WorkflowError, load_workflow
from loraloom.graph_runtime import workflow as wf_module

SCALE = "5f0b4a3e-0000-4000-8000-00000000000a"  # a subgraph id is a UUID, and the type of its nodes
OUTER = "5f0b4a3e-0000-4000-8000-00000000000b"


def link(id, origin, origin_slot, target, target_slot, type):
    return {"id": id, "origin_id": origin, "origin_slot": origin_slot, "target_id": target,
            "target_slot": target_slot, "type": type}


def scale_subgraph():
    """x -> Scale (factor promoted as the subgraph input 'factor') -> y. Its link ids repeat the root's:
    each graph has its own."""
    return {"id": SCALE, "name": "Scaler", "version": 1, "state": {"lastNodeId": 10, "lastLinkId": 3},
            "inputNode": {"id": -10, "bounding": [0, 0, 75, 100]}, "outputNode": {"id": -20, "bounding": [0, 0, 75, 100]},
            "inputs": [{"id": "in-x", "name": "x", "type": "NUMBER", "linkIds": [1]},
                       {"id": "in-f", "name": "factor", "type": "FLOAT", "linkIds": [2]}],
            "outputs": [{"id": "out-y", "name": "y", "type": "NUMBER", "linkIds": [3]}], "widgets": [],
            "nodes": [{"id": 10, "type": "Scale", "mode": 0, "widgets_values": [1.0],
                       "inputs": [{"name": "x", "type": "NUMBER", "link": 1},
                                  {"name": "factor", "type": "FLOAT", "link": 2, "widget": {"name": "factor"}}],
                       "outputs": [{"name": "y", "type": "NUMBER", "links": [3]}]}],
            "links": [link(1, -10, 0, 10, 0, "NUMBER"), link(2, -10, 1, 10, 1, "FLOAT"), link(3, 10, 0, -20, 0, "NUMBER")],
            "groups": [], "reroutes": []}


def instance(id, subgraph, x_link, out_links, widgets=None, mode=0):
    node = {"id": id, "type": subgraph, "mode": mode, "inputs": [{"name": "x", "type": "NUMBER", "link": x_link}],
            "outputs": [{"name": "y", "type": "NUMBER", "links": out_links}], "properties": {}}
    if widgets is not None:
        node["widgets_values"] = widgets
    return node


def v1_workflow():
    """Const(3) -> Scaler instance 2 (factor 2.5, promoted) -> Show, in the 1.0 schema."""
    return {"id": "00000000-0000-4000-8000-000000000001", "revision": 0, "version": 1,
            "state": {"lastNodeId": 3, "lastLinkId": 2, "lastGroupId": 0, "lastRerouteId": 1},
            "nodes": [{"id": 1, "type": "Const", "mode": 0, "widgets_values": [3],
                       "outputs": [{"name": "n", "type": "NUMBER", "links": [1]}]},
                      instance(2, SCALE, 1, [2], widgets=[2.5]),
                      {"id": 3, "type": "Show", "mode": 0, "inputs": [{"name": "x", "type": "NUMBER", "link": 2}]}],
            "links": [link(1, 1, 0, 2, 0, "NUMBER"), {**link(2, 2, 0, 3, 0, "NUMBER"), "parentId": 1}],
            "reroutes": [{"id": 1, "pos": [10, 10], "linkIds": [2]}], "groups": [], "config": {}, "extra": {},
            "definitions": {"subgraphs": [scale_subgraph()]}}


def test_a_subgraph_in_the_1_0_schema_flattens_and_runs(stubs):
    ui = v1_workflow()
    prompt = load_workflow(ui, stubs.registry).prompt
    assert {k: v["inputs"] for k, v in prompt.items()} == {
        "1": {"value": 3}, "2:10": {"x": ["1", 0], "factor": 2.5}, "3": {"x": ["2:10", 0]}}, \
        "inner ids are 'subgraph node:inner node'; a link in and out crosses the boundary; the promoted value wins"
    assert Runtime(registry=stubs.registry).run(ui).outputs == {"3": {"value": [7.5]}}


def test_promoted_values_named_first_then_by_position_and_unpromoted_widgets_keep_theirs(stubs):
    ui = v1_workflow()
    ui["nodes"][1]["widgets_values_named"] = {"factor": -1.0}
    assert load_workflow(ui, stubs.registry).prompt["2:10"]["inputs"]["factor"] == -1.0, "the named value"
    ui = v1_workflow()
    sub = ui["definitions"]["subgraphs"][0]
    del sub["inputs"][1], sub["links"][1]
    sub["nodes"][0]["inputs"][1]["link"] = None
    assert load_workflow(ui, stubs.registry).prompt["2:10"]["inputs"]["factor"] == 1.0, \
        "a widget that is not promoted keeps the inner node's value"


def twice_workflow(first_mode: int = 0) -> dict:
    """Outer holds two Scaler instances in a chain (factors 2 and -1, the first in ``first_mode``); the
    root uses Outer once."""
    outer = {"id": OUTER, "name": "Twice", "version": 1,
             "inputs": [{"id": "o-x", "name": "x", "type": "NUMBER", "linkIds": [5]}],
             "outputs": [{"id": "o-y", "name": "y", "type": "NUMBER", "linkIds": [7]}],
             "nodes": [instance(1, SCALE, 5, [6], widgets=[2.0], mode=first_mode),
                       instance(2, SCALE, 6, [7], widgets=[-1.0])],
             "links": [link(5, -10, 0, 1, 0, "NUMBER"), link(6, 1, 0, 2, 0, "NUMBER"), link(7, 2, 0, -20, 0, "NUMBER")]}
    ui = v1_workflow()
    ui["nodes"][1] = instance(2, OUTER, 1, [2])
    ui["definitions"]["subgraphs"].append(outer)
    return ui


def test_a_subgraph_used_twice_inside_another_gets_ids_per_instance(stubs):
    ui = twice_workflow()
    prompt = load_workflow(ui, stubs.registry).prompt
    assert {k: v["inputs"] for k, v in prompt.items()} == {
        "1": {"value": 3}, "2:1:10": {"x": ["1", 0], "factor": 2.0}, "2:2:10": {"x": ["2:1:10", 0], "factor": -1.0},
        "3": {"x": ["2:2:10", 0]}}
    assert Runtime(registry=stubs.registry).run(ui).outputs == {"3": {"value": [-6.0]}}


def test_a_bypassed_or_muted_subgraph_node(stubs):
    ui = v1_workflow()
    ui["nodes"][1]["mode"] = 4
    assert load_workflow(ui, stubs.registry).prompt["3"]["inputs"] == {"x": ["1", 0]}, \
        "bypassed: its NUMBER input goes on to the NUMBER output"
    ui["nodes"][1]["mode"] = 2
    prompt = load_workflow(ui, stubs.registry).prompt
    assert set(prompt) == {"1", "3"} and prompt["3"]["inputs"] == {}, "muted: neither it nor its inner nodes"


@pytest.mark.parametrize("mode, second", [(2, {"factor": -1.0}), (4, {"x": ["1", 0], "factor": -1.0})])
def test_a_muted_or_bypassed_subgraph_node_inside_a_subgraph_is_unfolded_as_the_editor_does(stubs, mode, second):
    """The shipped editor (frontend 1.58's graphToPrompt, checked in the page) skips a muted or bypassed
    subgraph node only at the top level: inside a subgraph its inner nodes are queued all the same,
    while the link from its output sees it muted (nothing) or bypassed (its input passed on)."""
    prompt = load_workflow(twice_workflow(first_mode=mode), stubs.registry).prompt
    assert {k: v["inputs"] for k, v in prompt.items()} == {
        "1": {"value": 3}, "2:1:10": {"x": ["1", 0], "factor": 2.0}, "2:2:10": second, "3": {"x": ["2:2:10", 0]}}


def test_a_bypassed_node_passes_the_input_of_the_wanted_type():
    """The editor's choice for a bypassed node: the same slot when its type fits, else the first
    input of the wanted type, else the first that fits both; -1 when none does."""
    flat = wf_module._Flattener({"nodes": [], "links": []}, None, "workflow")
    node = {"type": "X", "inputs": [{"type": "A"}, {"type": "B"}, {"type": "*"}],
            "outputs": [{"type": "B"}, {"type": "B"}, {"type": "C"}]}
    assert flat._bypass_slot(node, 1, "B") == 1
    assert flat._bypass_slot(node, 0, "B") == 1, "slot 0 is an A: the first B"
    assert flat._bypass_slot(node, 2, "C") == 2, "'*' fits anything"
    assert flat._bypass_slot({**node, "inputs": [{"type": "A"}]}, 0, "B") == -1
    assert flat._bypass_slot({**node, "inputs": [{"type": "A,B"}]}, 0, "B") == 0, "a list of types"


def test_a_missing_definition_names_the_node_and_the_id(stubs):
    ui = v1_workflow()
    ui["definitions"]["subgraphs"] = []
    with pytest.raises(WorkflowError, match=f"^node 2 \\({SCALE}\\): it is an instance of subgraph {SCALE}, which "
                                            "is not in definitions.subgraphs") as info:
        load_workflow(ui, stubs.registry)
    assert (info.value.node, info.value.kind) == ("2", "subgraph")


def test_a_subgraph_inside_itself_is_refused_naming_the_chain(stubs):
    ui = v1_workflow()
    outer = {"id": OUTER, "name": "Loop", "inputs": [], "outputs": [], "links": [],
             "nodes": [{"id": 4, "type": OUTER, "mode": 0}]}
    ui["definitions"]["subgraphs"].append(outer)
    ui["nodes"].append({"id": 9, "type": OUTER, "mode": 0})
    with pytest.raises(WorkflowError, match=r"^node 9:4 \(.*\): subgraph 'Loop' .* contains itself: subgraph "
                                            r"'Loop' .* -> subgraph 'Loop' .* \(in subgraph 'Loop' .*\)") as info:
        load_workflow(ui, stubs.registry)
    assert info.value.kind == "subgraph_cycle"


@pytest.mark.parametrize("break_it,fragment", [
    (lambda ui: ui["definitions"]["subgraphs"][0]["nodes"][0]["inputs"][0].update(link=99),
     r"^node 2:10 \(Scale\) input 'x': link 99 is used by a node but missing from 'links' \(in subgraph 'Scaler' "),
    (lambda ui: ui["links"][0].update(origin_id=42),
     r"node 2 \(.*\) input 'x': link 1 comes from node 42, which is not in the graph"),
    (lambda ui: ui["definitions"]["subgraphs"][0]["outputs"][0].update(linkIds=[77]),
     r"^node 2 \(.*\): output 0 of subgraph 'Scaler' .* uses link 77, which is missing from its 'links'"),
])
def test_dangling_links_name_the_node_link_and_subgraph(stubs, break_it, fragment):
    ui = v1_workflow()
    break_it(ui)
    with pytest.raises(WorkflowError, match=fragment) as info:
        load_workflow(ui, stubs.registry)
    assert info.value.kind == "dangling_link"


def test_a_link_loop_through_bypassed_nodes_is_refused(stubs):
    ui = v1_workflow()
    ui["nodes"][1]["mode"] = 4
    ui["nodes"][1]["inputs"][0]["link"] = 3  # the bypassed node's input comes from its own output
    ui["links"].append(link(3, 2, 0, 2, 0, "NUMBER"))
    with pytest.raises(WorkflowError, match="node 2 .*its links loop back to it") as info:
        load_workflow(ui, stubs.registry)
    assert info.value.kind == "link_cycle"


def test_subgraphs_that_unfold_past_the_node_limit_are_refused(stubs, monkeypatch):
    """Each level doubles the nodes: the count is checked while unfolding, not after."""
    monkeypatch.setattr(wf_module, "MAX_NODES", 50)
    ui = v1_workflow()
    defs = ui["definitions"]["subgraphs"]
    below = SCALE
    for level in range(8):
        sub_id = f"5f0b4a3e-0000-4000-8000-0000000001{level:02d}"
        defs.append({"id": sub_id, "name": f"L{level}", "inputs": [], "outputs": [], "links": [],
                     "nodes": [{"id": 1, "type": below, "mode": 0}, {"id": 2, "type": below, "mode": 0}]})
        below = sub_id
    ui["nodes"].append({"id": 9, "type": below, "mode": 0})
    with pytest.raises(WorkflowError, match="unfold into more than 50 nodes"):
        load_workflow(copy.deepcopy(ui), stubs.registry)


def test_a_non_finite_number_inside_a_subgraph_definition_is_located(stubs, tmp_path):
    ui = v1_workflow()
    ui["definitions"]["subgraphs"][0]["nodes"][0]["widgets_values"] = ["NAN_HERE"]
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(ui).replace('"NAN_HERE"', "NaN"))
    with pytest.raises(WorkflowError) as info:
        load_workflow(path, stubs.registry)
    assert (info.value.node, info.value.class_type) == ("10", "Scale")
    assert "definitions.subgraphs[0].nodes[0].widgets_values[0]" in str(info.value), str(info.value)


@pytest.mark.parametrize("proxy", [[["10", "factor"]], '[["10", "factor"]]', [["10", "factor", "10"]]])
def test_widgets_promoted_the_older_way_take_the_subgraph_nodes_values(stubs, proxy):
    """properties.proxyWidgets (a list or its JSON text; a third item is ignored) names the inner widgets
    the subgraph node shows; its widgets_values are their values in that order, as the editor reads them."""
    ui = v1_workflow()
    sub = ui["definitions"]["subgraphs"][0]
    del sub["inputs"][1], sub["links"][1]
    sub["nodes"][0]["inputs"][1]["link"] = None
    ui["nodes"][1]["properties"] = {"proxyWidgets": proxy}
    ui["nodes"][1]["widgets_values"] = [4.0]
    assert load_workflow(ui, stubs.registry).prompt["2:10"]["inputs"]["factor"] == 4.0
    ui["nodes"][1]["widgets_values"] = []
    assert load_workflow(ui, stubs.registry).prompt["2:10"]["inputs"]["factor"] == 1.0, "no value: the inner one"


@pytest.mark.parametrize("break_it,fragment", [
    (lambda ui: ui["definitions"]["subgraphs"][0]["links"][0].update(origin_slot="x"),
     r"subgraph 'Scaler' \(.*\): links\[0\] has a malformed id, node or slot"),
    (lambda ui: ui["definitions"]["subgraphs"][0].pop("nodes"),
     r"subgraph 'Scaler' \(.*\): a UI workflow needs 'nodes' and 'links' lists"),
    (lambda ui: ui["definitions"]["subgraphs"][0].update(id=7),
     r"definitions.subgraphs\[0\] needs a string 'id'"),
    (lambda ui: ui["definitions"]["subgraphs"].append(scale_subgraph()),
     r"subgraph 'Scaler' \(.*\) is defined twice"),
    (lambda ui: ui["definitions"]["subgraphs"][0]["outputs"].append(5),
     r"subgraph 'Scaler' \(.*\): each of its inputs and outputs must be an object"),
])
def test_a_malformed_definition_is_named(stubs, break_it, fragment):
    ui = v1_workflow()
    break_it(ui)
    with pytest.raises(WorkflowError, match=fragment):
        load_workflow(ui, stubs.registry)


@pytest.mark.parametrize("break_it", [
    lambda ui: ui["nodes"][2]["inputs"][0].update(link=[1, 2]),
    lambda ui: ui["definitions"]["subgraphs"][0]["outputs"][0].update(linkIds=[[3]]),
    lambda ui: ui["definitions"]["subgraphs"][0]["inputs"][1].update(linkIds=[{"a": 1}]),
    lambda ui: ui["nodes"][1]["inputs"][0].update(name=["x"]),
    lambda ui: ui["links"][0].update(origin_slot=-1),
])
def test_odd_values_in_a_subgraph_workflow_raise_nothing_but_our_error(stubs, break_it):
    """Unhashable or negative ids where the editor writes numbers: read, or a WorkflowError; never a TypeError."""
    ui = v1_workflow()
    break_it(ui)
    try:
        load_workflow(ui, stubs.registry)
    except WorkflowError:
        pass


def _paths(value, path=()):
    """Every place in a JSON document, as a path of keys and indices."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, path + (key,))


ODD = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.text(max_size=4), st.lists(st.integers(-1, 3),
                max_size=2), st.sampled_from([SCALE, OUTER, -10, -20, "Reroute", "PrimitiveNode", {"name": "x"}]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_subgraph_workflow_with_any_value_changed_raises_nothing_but_our_errors(stubs, data):
    """Up to three places of a working subgraph workflow (with a nested instance) set to odd values:
    it runs, or fails with one of our errors."""
    ui = v1_workflow()
    ui["definitions"]["subgraphs"].append({"id": OUTER, "name": "Twice", "inputs": scale_subgraph()["inputs"][:1],
                                          "outputs": scale_subgraph()["outputs"], "links": [
                                              link(1, -10, 0, 1, 0, "NUMBER"), link(3, 1, 0, -20, 0, "NUMBER")],
                                          "nodes": [instance(1, SCALE, 1, [3], widgets=[2.0])]})
    ui["nodes"][1]["type"] = OUTER
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(ui) if p]
        path = data.draw(st.sampled_from(paths))
        parent = ui
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = data.draw(ODD)
    try:
        Runtime(registry=stubs.registry).run(ui)
    except LoomError as exc:
        assert str(exc), "errors carry a message"
