"""Property test across modules (jsonio, workflow, graph, executor through Runtime): malformed
workflow JSON gives only our clear errors, never a crash. It maps to no single module on purpose."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraloom.graph_runtime import LoomError, Runtime

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["Const", "Add", "Show", "Scale", "1", "2"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=20)
link = st.tuples(st.sampled_from(["1", "2", "3", 1, "x"]), st.integers(-2, 3)).map(list)
node = st.fixed_dictionaries({"class_type": st.one_of(st.sampled_from(["Const", "Add", "Scale", "Show", "Nope"]),
                                                      values),
                              "inputs": st.one_of(st.dictionaries(st.sampled_from(["value", "a", "b", "x", "factor",
                                                                                   "zz"]),
                                                                  st.one_of(values, link), max_size=4), values)})
api = st.dictionaries(st.sampled_from(["1", "2", "3", "4"]), st.one_of(node, values), max_size=4)
ui_node = st.fixed_dictionaries({"id": st.one_of(st.integers(0, 5), values), "type": st.one_of(
    st.sampled_from(["Const", "Scale", "Show", "Reroute", "PrimitiveNode"]), values),
    "mode": st.sampled_from([0, 2, 4]), "inputs": st.one_of(st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["x", "a", "factor"]), "link": st.one_of(st.none(), st.integers(0, 5))}),
        max_size=3), values), "widgets_values": st.one_of(st.lists(scalars, max_size=4), values)})
ui = st.fixed_dictionaries({"nodes": st.one_of(st.lists(ui_node, max_size=5), values),
                            "links": st.one_of(st.lists(st.one_of(st.lists(st.one_of(st.integers(0, 5), values),
                                                                           min_size=5, max_size=6), values),
                                                        max_size=5), values)})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(api, ui, values))
def test_malformed_workflows_only_raise_our_errors(stubs, wf):
    rt = Runtime(registry=stubs.registry)
    try:
        rt.run(wf)
    except LoomError as exc:
        assert str(exc), "errors carry a message"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(api, ui, values))
def test_malformed_workflow_files_only_raise_our_errors(stubs, tmp_path, wf):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf, allow_nan=True))
    try:
        Runtime(registry=stubs.registry).validate(path)
    except LoomError:
        pass
