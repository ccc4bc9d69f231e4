"""schema.py: declaration checks at import, ComfyUI V1 attributes, object_info and the registry's
ComfyUI mappings."""

import math

import pytest

from loraloom.graph_runtime import Combo, Float, Int, Link, NodeRegistry, Output, SchemaError, String, node


def declare(inputs, execute, **kw):
    kw.setdefault("outputs", [Output("NUMBER")])
    return node(category="t", inputs=inputs, **kw)(type("X", (), {"execute": execute}))


@pytest.mark.parametrize("inputs,execute,fragment", [
    ([Int("a", 1)], lambda self, b: 0, "input 'a' is not a parameter of execute"),
    ([Int("a", 1)], lambda self, a, c: 0, "execute parameter 'c' has no declared input"),
    ([Int("a", 1), Int("a", 2)], lambda self, a: 0, "input 'a' is declared twice"),
    ([Int("a", 5, min=0, max=3)], lambda self, a: 0, "default 5 is above max 3"),
    ([Float("a", -1.0, min=0.0)], lambda self, a: 0, "default -1.0 is below min 0.0"),
    ([Float("a", 0.0, min=2.0, max=1.0)], lambda self, a: 0, "min 2.0 is above max 1.0"),
    ([Float("a", math.nan)], lambda self, a: 0, "not a finite number"),
    ([Combo("a", ["x"], "y")], lambda self, a: 0, "default 'y' is not one of ['x']"),
    ([Link("a", "model")], lambda self, a: 0, "UPPER_SNAKE socket type"),
    ([Int("A", 1)], lambda self, A: 0, "not snake_case"),
    ([Link("a", "NUM", optional=True)], lambda self, a: 0, "optional input 'a' needs a default"),
])
def test_contradictions_fail_at_declaration(inputs, execute, fragment):
    with pytest.raises(SchemaError) as info:
        declare(inputs, execute)
    assert fragment in str(info.value), str(info.value)
    assert "node X (" in str(info.value), "the message says which class"


def test_comfy_v1_attributes_and_object_info():
    @node(category="loraloom/test", display_name="Demo Node", description="Does a demo.",
          inputs=[Link("model", "BASE_MODEL"), Float("weight", 1.0, min=-4.0, max=4.0, step=0.05, tooltip="w"),
                  Int("seed", 0, min=0, max=2**32), String("text", "", multiline=True),
                  Combo("mode", ["a", "b"], "a"), Float("extra", 0.5, optional=True)],
          outputs=[Output("MODEL_RECIPE", "model"), Output("IMAGE", "image")])
    class Demo:
        def execute(self, model, weight, seed, text, mode, extra=0.5):
            return (model, None)

    types = Demo.INPUT_TYPES()
    assert types["required"]["model"] == ("BASE_MODEL",)
    assert types["required"]["weight"] == ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                                     "tooltip": "w"})
    assert types["required"]["seed"][1]["control_after_generate"] is True
    assert types["required"]["text"][1]["multiline"] is True
    assert types["required"]["mode"] == (["a", "b"], {"default": "a"})
    assert types["optional"]["extra"][1]["default"] == 0.5
    assert Demo.RETURN_TYPES == ("MODEL_RECIPE", "IMAGE") and Demo.RETURN_NAMES == ("model", "image")
    assert (Demo.FUNCTION, Demo.CATEGORY, Demo.OUTPUT_NODE, Demo.DESCRIPTION) == \
        ("execute", "loraloom/test", False, "Does a demo.")
    info = NodeRegistry([Demo]).object_info()["Demo"]
    assert info["input_order"] == {"required": ["model", "weight", "seed", "text", "mode"], "optional": ["extra"]}
    assert info["output"] == ["MODEL_RECIPE", "IMAGE"] and info["output_is_list"] == [False, False]
    assert info["output_name"] == ["model", "image"]
    assert info["name"] == "Demo" and info["display_name"] == "Demo Node"
    assert info["python_module"].startswith("custom_nodes.")
    assert info["output_node"] is False and info["category"] == "loraloom/test"


def test_is_changed_nan_for_not_idempotent_and_dynamic_combo():
    listing = ["one.safetensors"]

    @node(category="t", inputs=[Combo("name", lambda: list(listing))], outputs=[Output("NUMBER")],
          not_idempotent=True)
    class Pick:
        def execute(self, name):
            return (0,)

    assert math.isnan(Pick.IS_CHANGED(name="one.safetensors"))
    listing.append("two.safetensors")
    assert Pick.INPUT_TYPES()["required"]["name"][0] == ["one.safetensors", "two.safetensors"], \
        "COMBO options from a callable are listed afresh"


def test_registry_refuses_duplicate_ids():
    @node(category="t", outputs=[Output("NUMBER")], id="Same")
    class A:
        def execute(self):
            return (0,)

    @node(category="t", outputs=[Output("NUMBER")], id="Same")
    class B:
        def execute(self):
            return (0,)

    reg = NodeRegistry([A])
    with pytest.raises(SchemaError, match="already registered"):
        reg.register(B)


def test_comfy_export_flag_keeps_node_out_of_mappings(stubs):
    from loraloom.graph_runtime import NodeRegistry, Output, node

    @node(category="t", outputs=[], output_node=True, id="SaveImage", comfy_export=False)
    class StandIn:
        def execute(self):
            return ()

    reg = NodeRegistry([StandIn, stubs.classes["Const"]])
    classes, names = reg.comfy_mappings()
    assert "SaveImage" not in classes and "Const" in classes and "SaveImage" in reg
