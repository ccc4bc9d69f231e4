"""Comfy-only nodes: nodes on ComfyUI's own values (MODEL, CLIP) live in ComfyUI's mappings only."""

import pytest

from loraloom.graph_runtime import Link, NodeRegistry, Output, SchemaError, node


def _declare(comfy_only: bool):
    @node(category="t", inputs=[Link("model", "MODEL")], outputs=[Output("MODEL", "model")], comfy_only=comfy_only)
    class Patch:
        def execute(self, model):
            return (model.clone(),)

    return Patch


def test_only_a_comfy_only_node_may_take_comfyuis_own_values():
    with pytest.raises(SchemaError, match=r"node Patch .*socket type\(s\) MODEL are ComfyUI's own values.*"
                                          r"comfy_only=True"):
        _declare(False)
    assert _declare(True).SCHEMA.comfy_only


def test_the_headless_registry_refuses_a_comfy_only_node_and_a_comfy_registry_lists_it():
    cls = _declare(True)
    with pytest.raises(SchemaError, match="comfy_only: it runs only inside ComfyUI"):
        NodeRegistry([cls])
    registry = NodeRegistry([cls], comfy=True)
    assert registry.comfy_mappings()[0] == {"Patch": cls} and registry.copy().comfy


def test_queue_checks_of_a_comfy_only_node_see_its_widgets():
    from loraloom.comfy_integration import queue_check
    from loraloom.nodes.comfy_bridge import ApplyLoRA

    assert queue_check(ApplyLoRA, {"model": None, "lora": None, "strength_model": 1.0, "strength_clip": 1.0,
                                   "block_weights": ""}) is True
    problem = queue_check(ApplyLoRA, {"model": None, "lora": None, "strength_model": 11.0, "strength_clip": 1.0,
                                      "block_weights": ""})
    assert "input 'strength_model': 11.0 is above max 10.0" in problem, problem
