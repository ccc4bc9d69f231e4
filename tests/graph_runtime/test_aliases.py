"""Node aliases: an older id of a node still loads, validates and runs as the node itself, with the
same cache keys; ComfyUI's mappings and /object_info list it as deprecated; ids and aliases never
collide."""

import pytest

from loraloom.graph_runtime import Float, Int, Link, NodeRegistry, Output, Runtime, SchemaError, node

calls: list[str] = []


@node(id="NewConst", aliases=("Const", "OlderConst"), category="test", display_name="Test Const",
      inputs=[Int("value", 1, min=-10, max=10)], outputs=[Output("NUMBER", "n")])
class Const:
    def execute(self, value):
        calls.append("Const")
        return (value,)


@node(id="NewScale", aliases=("Scale",), category="test", display_name="Test Scale",
      inputs=[Link("x", "NUMBER"), Float("factor", 1.0, min=-10.0, max=10.0)], outputs=[Output("NUMBER", "y")])
class Scale:
    def execute(self, x, factor):
        calls.append("Scale")
        return (x * factor,)


@node(category="test", inputs=[Link("x", "NUMBER")], outputs=[], output_node=True)
class Show:
    def execute(self, x):
        calls.append("Show")
        return {"ui": {"value": [x]}}


def registry():
    return NodeRegistry([Const, Scale, Show])


def graph(const="NewConst", scale="NewScale", factor=2.0):
    return {"1": {"class_type": const, "inputs": {"value": 3}},
            "2": {"class_type": scale, "inputs": {"x": ["1", 0], "factor": factor}},
            "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}}}


def test_an_alias_resolves_to_its_node_and_iteration_lists_ids_only():
    reg = registry()
    assert reg.get("Const") is Const and reg.get("OlderConst") is Const and reg.get("NewConst") is Const
    assert "Const" in reg and "Nothing" not in reg and reg.get("Nothing") is None
    assert reg.canonical("Scale") == "NewScale" and reg.canonical("NewScale") == "NewScale"
    assert reg.canonical(["Scale"]) is None, "a workflow may hold any JSON value where an id belongs"
    assert list(reg) == ["NewConst", "NewScale", "Show"] and len(reg) == 3
    assert reg.aliases() == {"Const": "NewConst", "OlderConst": "NewConst", "Scale": "NewScale"}
    assert reg.copy().get("OlderConst") is Const, "a copy keeps the aliases"


@pytest.mark.parametrize("aliases, fragment", [
    (("newThing",), "alias 'newThing' is not a PascalCase id"),
    (("Thing",), "alias 'Thing' is the node's own id"),
    (("Old", "Old"), "name one id twice"),
    ("Old", "one string"),
])
def test_bad_aliases_fail_at_declaration(aliases, fragment):
    with pytest.raises(SchemaError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        @node(id="Thing", aliases=aliases, category="t", outputs=[], output_node=True)
        class Thing:
            def execute(self):
                return ()


def _declare(node_id, aliases=()):
    @node(id=node_id, aliases=aliases, category="t", outputs=[], output_node=True)
    class Other:
        def execute(self):
            return ()

    return Other


@pytest.mark.parametrize("node_id, aliases, fragment", [
    ("Other", ("NewScale",), "alias 'NewScale' is already the id of node NewScale"),
    ("Other", ("Const",), "alias 'Const' is already an alias of node NewConst"),
    ("Scale", (), "id 'Scale' is already an alias of node NewScale"),
    ("Other", ("Show",), "alias 'Show' is already the id of node Show"),
])
def test_an_alias_taken_by_another_node_fails_at_registration_naming_both(node_id, aliases, fragment):
    reg = registry()
    before = (list(reg), reg.aliases())
    with pytest.raises(SchemaError, match=fragment) as info:
        reg.register(_declare(node_id, aliases))
    assert f"node {node_id} " in str(info.value) and info.value.fix, str(info.value)
    assert (list(reg), reg.aliases()) == before, "a refused class leaves the registry as it was"


def test_replacing_a_node_drops_its_old_aliases():
    reg = registry()

    @node(id="NewScale", aliases=("Scaler",), category="t", inputs=[Link("x", "NUMBER")], outputs=[Output("NUMBER")])
    class Scale2:
        def execute(self, x):
            return (x,)

    reg.register(Scale2, replace=True)
    assert reg.get("Scaler") is Scale2 and "Scale" not in reg, reg.aliases()


def test_an_old_id_workflow_validates_runs_and_shares_the_cache_of_the_new_ids(tmp_path):
    rt = Runtime(registry=registry(), output_dir=tmp_path)
    new, old = rt.validate(graph()), rt.validate(graph("Const", "Scale"))
    assert rt.node_keys(new) == rt.node_keys(old), "an alias keys a node as its id does"
    assert rt.node_keys(new) != rt.node_keys(rt.validate(graph(factor=3.0))), "the keys still see the inputs"
    calls.clear()
    first = rt.run(graph("OlderConst", "Scale"))
    assert sorted(first.executed) == ["1", "2", "3"] and first.outputs == {"3": {"value": [6.0]}}
    calls.clear()
    again = rt.run(graph())
    assert again.executed == [] and calls == [], "the renamed workflow finds what the old one computed"
    assert again.outputs == first.outputs


def test_validation_names_a_node_by_the_id_it_was_placed_with(tmp_path):
    rt = Runtime(registry=registry(), output_dir=tmp_path)
    with pytest.raises(Exception) as info:
        rt.validate(graph("Const", "Scale", factor=99.0))
    assert "node 2 (Scale) input 'factor'" in str(info.value), str(info.value)


def test_object_info_and_comfy_mappings_list_aliases_as_deprecated():
    reg = registry()
    info = reg.object_info()
    assert set(info) == {"NewConst", "NewScale", "Show", "Const", "OlderConst", "Scale"}
    assert "deprecated" not in info["NewScale"]
    old = info["Scale"]
    assert old["deprecated"] is True and old["name"] == "Scale"
    assert old["display_name"] == "Test Scale [old id Scale]", "the editor shows which old id it is"
    assert {k: v for k, v in old.items() if k not in ("name", "display_name", "deprecated")} == \
        {k: v for k, v in info["NewScale"].items() if k not in ("name", "display_name")}, "the same node"

    classes, names = reg.comfy_mappings()
    assert classes["NewScale"] is Scale and not getattr(Scale, "DEPRECATED", False)
    deprecated = classes["Scale"]
    assert issubclass(deprecated, Scale) and deprecated.DEPRECATED is True and deprecated.ALIAS == "Scale"
    assert deprecated.INPUT_TYPES() == Scale.INPUT_TYPES() and deprecated.SCHEMA is Scale.SCHEMA
    assert reg.comfy_mappings()[0]["Scale"] is deprecated, "one class per alias, however often asked"
    assert names == {"NewConst": "Test Const", "Const": "Test Const [old id Const]",
                     "OlderConst": "Test Const [old id OlderConst]", "NewScale": "Test Scale",
                     "Scale": "Test Scale [old id Scale]", "Show": "Show"}
