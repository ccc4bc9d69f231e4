"""graph.py: building and validating a prompt. Every validation error type, asserted by type, node id
and input name; all collected in one pass."""

import math

import pytest

from loraloom.graph_runtime import ValidationError
from loraloom.graph_runtime.graph import validate_prompt


def errors_of(stubs, wf):
    with pytest.raises(ValidationError) as info:
        validate_prompt(wf, stubs.registry)
    return info.value


def found(err, node_id, kind, input_name=None):
    entry = err.node_errors.get(node_id)
    assert entry is not None, f"node {node_id} should have errors; got {err.node_errors}"
    hits = [e for e in entry["errors"] if e["type"] == kind
            and (input_name is None or e["extra_info"].get("input_name") == input_name)]
    assert hits, f"node {node_id}: expected {kind} on {input_name}; got {entry['errors']}"
    return hits[0]


def base():
    return {"1": {"class_type": "Const", "inputs": {"value": 3}},
            "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 2.0}},
            "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}}}


@pytest.mark.parametrize("mutate,node_id,kind,input_name,fragment", [
    (lambda w: w["2"].update(class_type="Nope"), "2", "missing_node_type", None, "Nope"),
    (lambda w: w["2"]["inputs"].pop("x"), "2", "required_input_missing", "x", "required input is missing"),
    (lambda w: w["2"]["inputs"].update(x=["9", 0]), "2", "bad_linked_input", "x", "node 9"),
    (lambda w: w["2"]["inputs"].update(x=["1", 3]), "2", "bad_linked_input", "x", "no output slot 3"),
    (lambda w: w["2"]["inputs"].update(x=["1"]), "2", "bad_linked_input", "x", "not [node_id, slot_index]"),
    (lambda w: w["2"]["inputs"].update(x=7), "2", "invalid_input_type", "x", "takes a link"),
    (lambda w: w["3"]["inputs"].update(x=["2", 1]), "3", "return_type_mismatch", "x", "expects NUMBER"),
    (lambda w: w["2"]["inputs"].update(factor=11.0), "2", "value_bigger_than_max", "factor", "above max 10.0"),
    (lambda w: w["2"]["inputs"].update(factor=-11), "2", "value_smaller_than_min", "factor", "below min -10.0"),
    (lambda w: w["2"]["inputs"].update(factor=math.nan), "2", "value_not_finite", "factor", "not a finite"),
    (lambda w: w["2"]["inputs"].update(factor=math.inf), "2", "value_not_finite", "factor", "not a finite"),
    (lambda w: w["2"]["inputs"].update(factor="2"), "2", "invalid_input_type", "factor", "not a number"),
    (lambda w: w["1"]["inputs"].update(value=2.5), "1", "invalid_input_type", "value", "not an integer"),
    (lambda w: w["1"]["inputs"].update(value=True), "1", "invalid_input_type", "value", "not an integer"),
    (lambda w: w["2"]["inputs"].update(facter=1.0), "2", "unknown_input", "facter", "no such input"),
    (lambda w: w.update({"4": {"class_type": "Seeded", "inputs": {"mode": "pow"}},
                         "5": {"class_type": "Show", "inputs": {"x": ["4", 0]}}}),
     "4", "value_not_in_list", "mode", "'pow' is not one of ['add', 'mul']"),
])
def test_each_error_type(stubs, mutate, node_id, kind, input_name, fragment):
    wf = base()
    mutate(wf)
    err = errors_of(stubs, wf)
    hit = found(err, node_id, kind, input_name)
    assert fragment in hit["details"], f"details should say {fragment!r}: {hit['details']}"
    assert f"node {node_id} (" in hit["details"], "details name the node id and class"
    assert err.error["type"] == "prompt_outputs_failed_validation"


def test_cycle_names_the_nodes_on_it(stubs):
    wf = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0]}},
          "2": {"class_type": "Add", "inputs": {"a": ["1", 0]}},
          "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}}}
    err = errors_of(stubs, wf)
    for nid in ("1", "2"):
        hit = found(err, nid, "dependency_cycle")
        assert "1 (Add) -> 2 (Add)" in hit["details"], hit["details"]
    assert "3" not in err.node_errors
    assert err.node_errors["1"]["dependent_outputs"] == ["3"]


def test_no_output_node(stubs):
    err = errors_of(stubs, {"1": {"class_type": "Const", "inputs": {"value": 1}}})
    assert err.error["type"] == "prompt_no_outputs"


def test_all_problems_collected_in_one_pass(stubs):
    wf = base()
    wf["1"]["inputs"]["value"] = 5000
    wf["2"]["inputs"]["factor"] = "x"
    wf["4"] = {"class_type": "Nope", "inputs": {}}
    err = errors_of(stubs, wf)
    assert set(err.node_errors) == {"1", "2", "4"}, err.node_errors
    assert err.node_errors["1"]["dependent_outputs"] == ["3"]
    text = str(err)
    assert "node 1 (Const) input 'value': 5000 is above max 1000" in text, text


def test_defaults_fill_missing_widgets(stubs):
    wf = {"1": {"class_type": "Seeded", "inputs": {}}, "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}}}
    valid = validate_prompt(wf, stubs.registry)
    assert valid.nodes["1"]["inputs"] == {"mode": "add", "seed": 0, "steps": 4}


def test_integral_float_becomes_int(stubs):
    wf = base()
    wf["1"]["inputs"]["value"] = 4.0
    assert validate_prompt(wf, stubs.registry).nodes["1"]["inputs"]["value"] == 4


def test_ten_thousand_node_chain_validates(stubs):
    valid = validate_prompt(stubs.chain(10_000), stubs.registry)
    assert len(valid.nodes) == 10_000 and valid.outputs == ["9999"]


def test_error_json_shape_matches_comfyui(stubs):
    wf = base()
    wf["2"]["inputs"]["factor"] = 99.0
    body = errors_of(stubs, wf).to_json()
    assert set(body) == {"error", "node_errors"}
    entry = body["node_errors"]["2"]
    assert set(entry) == {"class_type", "errors", "dependent_outputs"}
    assert set(entry["errors"][0]) == {"type", "message", "details", "extra_info"}
    assert entry["errors"][0]["extra_info"]["input_name"] == "factor"


def test_check_inputs_hook_reports_named_input(stubs):
    from loraloom.graph_runtime import Int, Output, node

    @node(category="t", inputs=[Int("width", 64, min=8, max=4096)], outputs=[Output("NUMBER")])
    class Size:
        @classmethod
        def check_inputs(cls, constants):
            w = constants["width"]
            return {"width": f"{w} is not a multiple of 8"} if w % 8 else {}

        def execute(self, width):
            return (width,)

    reg = stubs.registry.copy()
    reg.register(Size)
    wf = {"1": {"class_type": "Size", "inputs": {"width": 65}}, "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}}}
    with pytest.raises(ValidationError) as info:
        validate_prompt(wf, reg)
    hit = found(info.value, "1", "invalid_input", "width")
    assert hit["details"] == "node 1 (Size) input 'width': 65 is not a multiple of 8"


def _frame_registry(stubs, rules):
    """The stub registry plus Frame (width, height, divisor) whose rules are ``rules`` (its check_inputs)."""
    from loraloom.graph_runtime import Int, Output, node

    @node(category="t", inputs=[Int("width", 64, min=8, max=4096), Int("height", 64, min=8, max=4096),
                                Int("divisor", 1, min=1, max=8)], outputs=[Output("NUMBER")])
    class Frame:
        check_inputs = classmethod(rules)

        def execute(self, width, height, divisor):
            return (width,)

    reg = stubs.registry.copy()
    reg.register(Frame)
    return reg


def _frame(**inputs):
    return {"1": {"class_type": "Frame", "inputs": inputs}, "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}}}


def test_node_rules_report_beside_range_errors_on_the_values_that_passed(stubs):
    seen = []

    def check_inputs(cls, constants):
        seen.append(dict(constants))
        found = {n: f"{constants[n]} is not a multiple of 8" for n in ("width", "height")
                 if n in constants and constants[n] % 8}
        if "width" in constants and "divisor" in constants and constants["width"] % constants["divisor"]:
            found["divisor"] = "does not divide width"
        return found

    with pytest.raises(ValidationError) as info:
        validate_prompt(_frame(width=130, height=9999, divisor=0), _frame_registry(stubs, check_inputs))
    found(info.value, "1", "value_bigger_than_max", "height")
    found(info.value, "1", "value_smaller_than_min", "divisor")
    assert found(info.value, "1", "invalid_input", "width")["details"] == \
        "node 1 (Frame) input 'width': 130 is not a multiple of 8", "a range error elsewhere must not hide it"
    assert len(info.value.node_errors["1"]["errors"]) == 3, info.value.node_errors
    assert seen == [{"width": 130}], "the rules see only the values that passed their own checks (divisor 0 " \
                                     "would divide by zero)"


def test_a_rule_that_assumed_a_refused_input_adds_no_noise(stubs):
    def check_inputs(cls, constants):
        return {"width": "too wide"} if constants["width"] // (constants["height"] - 64) > 4 else {}

    registry = _frame_registry(stubs, check_inputs)
    for refused in (1, ["9", 0]):  # below min; a link to no node
        with pytest.raises(ValidationError) as info:
            validate_prompt(_frame(width=64, height=refused), registry)
        assert len(info.value.node_errors["1"]["errors"]) == 1, \
            f"its KeyError on the refused height is not a second problem: {info.value}"
    with pytest.raises(ValidationError) as info:
        validate_prompt(_frame(width=64, height=64), registry)
    assert "check_inputs raised ZeroDivisionError" in str(info.value), "given every value, its crash is reported"


def _facts_registry(stubs):
    """Source (its output's facts: the parity of ``value``; value 13 breaks its fact-finding), Pass (passes its
    input's facts on), Check (checks ``n`` against the parity of what feeds it)."""
    from loraloom.graph_runtime import Int, InputError, Link, Output, node

    @node(category="t", inputs=[Int("value", 0)], outputs=[Output("NUMBER")])
    class Source:
        @classmethod
        def output_facts(cls, constants, upstream):
            if constants.get("value") == 13:
                raise OSError("unlucky")
            return {"parity": constants["value"] % 2} if "value" in constants else None

        def execute(self, value):
            return (value,)

    @node(category="t", inputs=[Link("x", "NUMBER")], outputs=[Output("NUMBER")])
    class Pass:
        @classmethod
        def output_facts(cls, constants, upstream):
            return upstream.get("x")

        def execute(self, x):
            return (x,)

    @node(category="t", inputs=[Link("x", "NUMBER"), Int("n", 0, max=100)], outputs=[], output_node=True)
    class Check:
        @classmethod
        def check_upstream(cls, constants, upstream):
            parity = upstream["x"]["parity"]
            if "n" in constants and constants["n"] % 2 != parity:
                return {"n": InputError(f"{constants['n']} is not of its source's parity.", value=constants["n"],
                                        limit=parity, fix="add one")}
            return {}

        def execute(self, x, n):
            return {}

    reg = stubs.registry.copy()
    for cls in (Source, Pass, Check):
        reg.register(cls)
    return reg


def _facts_chain(value, n, passes=2):
    wf = {"s": {"class_type": "Source", "inputs": {"value": value}}}
    previous = "s"
    for i in range(passes):
        wf[f"p{i}"] = {"class_type": "Pass", "inputs": {"x": [previous, 0]}}
        previous = f"p{i}"
    wf["c"] = {"class_type": "Check", "inputs": {"x": [previous, 0], "n": n}}
    return wf


def test_upstream_facts_flow_through_links_to_the_rules_that_need_them(stubs):
    registry = _facts_registry(stubs)
    validate_prompt(_facts_chain(3, 5), registry)
    with pytest.raises(ValidationError) as info:
        validate_prompt(_facts_chain(3, 4), registry)
    hit = found(info.value, "c", "invalid_input", "n")
    assert hit["details"] == "node c (Check) input 'n': 4 is not of its source's parity. Fix: add one"
    assert (hit["extra_info"]["value"], hit["extra_info"]["limit"]) == (4, 1)
    # refused by its own spec: the rule is not asked again; a fact that cannot be worked out is unknown
    with pytest.raises(ValidationError) as info:
        validate_prompt(_facts_chain(3, 101), registry)
    assert len(info.value.node_errors["c"]["errors"]) == 1, info.value
    validate_prompt(_facts_chain(13, 4), registry)
    # the facts flow in one pass over the graph: a long chain validates quickly
    validate_prompt(_facts_chain(3, 5, passes=5000), registry)

