"""Run by tests/test_comfy_v3.py with ComfyUI's Python in the ComfyUI folder: loads the pack as ComfyUI
loads a custom node (nodes.load_custom_node) and prints what it registered, and, for V3 nodes, how
they answer ComfyUI's calls, as JSON on a last line starting with "FACTS ".

Usage: python comfy_v3_probe.py PACK_FOLDER SCRATCH_FOLDER
"""

import asyncio
import inspect
import json
import logging
import sys
from pathlib import Path


def load(pack: str):
    """ComfyUI's own loading of ``pack``; returns (loaded, our registered classes, the pack module, log)."""
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], "--cpu"]
    import nodes

    log = []
    handler = logging.Handler()
    handler.emit = lambda record: log.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    loaded = asyncio.run(nodes.load_custom_node(pack, set(), module_parent="custom_nodes"))
    ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items()
            if str(getattr(v, "RELATIVE_PYTHON_MODULE", "")).startswith("custom_nodes.")}
    return loaded, ours, sys.modules.get(pack.replace(".", "_x_")), log


def comfy_call(cls, name: str, hidden: dict | None = None, **inputs):
    """``cls.name(**inputs)`` as ComfyUI's executor calls a V3 node's method: on a locked clone."""
    from comfy_api.internal import make_locked_method_func

    return make_locked_method_func(cls, name, cls.PREPARE_CLASS_CLONE(hidden or {}))(**inputs)


def defaults(cls) -> dict:
    return {inp.name: inp.default for inp in cls.LOOM_NODE.SCHEMA.widgets if inp.has_default}


REFUSED = {"Sample": {"width": 130}, "WeightedBlend": {"weight": 11.0}, "LoadBase": {"dtype": "fp64"},
           "SaveLoRA": {"filename_prefix": "../x"}}


def v3_facts(ours: dict, pack, scratch: Path) -> dict:
    from comfy_api.internal import first_real_override
    from comfy_api.latest import io

    facts = {}
    facts["argspec_mismatch"] = [nid for nid, cls in ours.items() if cls.LOOM_NODE.SCHEMA.widgets and inspect.getfullargspec(
        first_real_override(cls, "validate_inputs")).args[1:] != [i.name for i in cls.LOOM_NODE.SCHEMA.widgets]]
    facts["refused"] = {}
    for nid, values in REFUSED.items():
        given = {**defaults(ours[nid]), **values}
        facts["refused"][nid] = [comfy_call(ours[nid], "validate_inputs", **given),
                                 ours[nid].LOOM_NODE.VALIDATE_INPUTS(**given)]
    facts["accepted"] = comfy_call(ours["Sample"], "validate_inputs", **defaults(ours["Sample"]))

    base = {"source": "tiny-sd15", "config": "auto", "dtype": "fp32", "device": "cpu"}
    made = comfy_call(ours["LoadBase"], "execute", **base)
    fused = comfy_call(ours["Fuse"], "execute", model=made.args[0], lora_scale=1.0, adapter_names="")
    facts["execute"] = {"base": [type(made).__name__, len(made.args), made.ui],
                        "fuse": [type(fused).__name__, len(fused.args), fused.ui]}

    prompt = {"1": {"class_type": "LoadBase", "inputs": base},
              "2": {"class_type": "Sample", "inputs": {**defaults(ours["Sample"]), "model": ["1", 0]}},
              "5": {"class_type": "SweepGrid", "inputs": {"images": ["2", 0], "x_axis": "2.seed=1,2", "y_axis": "",
                                                         "z_axis": "", "seeds": ""}}}
    grid = comfy_call(ours["SweepGrid"], "execute", hidden={io.Hidden.prompt: prompt, io.Hidden.unique_id: "5"},
                      **{k: v for k, v in prompt["5"]["inputs"].items()})
    facts["sweep"] = {"result": grid.args, "expand": {k: v["class_type"] for k, v in (grid.expand or {}).items()},
                      "enable_expand": ours["SweepGrid"].GET_SCHEMA().enable_expand,
                      "cells_node": ours["SweepGridCells"].LOOM_NODE.SCHEMA.id,
                      "seeds": sorted(v["inputs"]["seed"] for v in grid.expand.values() if "seed" in v["inputs"])}

    # COMBO lists are read when ComfyUI asks (object_info, validation), as V1 reads them
    comfy_v3, graph_runtime = pack.comfy_v3, pack.graph_runtime
    folder = scratch / "loras"
    folder.mkdir()
    graph_runtime.current_context().folders.lora_dirs.append(folder)
    before = ours["LoadLoRA"].GET_NODE_INFO_V1()["input"]["required"]["lora_name"][1]["options"]
    (folder / "probe-new.safetensors").write_bytes(b"")
    after = ours["LoadLoRA"].GET_NODE_INFO_V1()["input"]["required"]["lora_name"][1]["options"]
    facts["listed"] = ["probe-new.safetensors" in before, "probe-new.safetensors" in after]
    # the change check is V1's: a LoRA file's content fingerprint
    prints = []
    for content in (b"one", b"two"):
        (folder / "probe-new.safetensors").write_bytes(content)
        prints.append([comfy_call(ours["LoadLoRA"], "fingerprint_inputs", lora_name="probe-new.safetensors"),
                       ours["LoadLoRA"].LOOM_NODE.IS_CHANGED(lora_name="probe-new.safetensors")])
    facts["fingerprint"] = prints

    # what a schema may say that no node says yet: old ids, ComfyUI's own socket types
    Float, Link, Output, node = graph_runtime.Float, graph_runtime.Link, graph_runtime.Output, graph_runtime.node

    @node(id="LoraLoomProbe", aliases=("ProbeOld",), comfy_only=True, category="LoRA Loom/probe",
          display_name="Loom Probe",
          inputs=[Link("model", "MODEL"), Link("clip", "CLIP"), Float("strength", 1.0, min=-4.0, max=4.0)],
          outputs=[Output("MODEL", "model"), Output("CLIP", "clip"), Output("LORA_WEIGHTS", "lora")])
    class Probe:
        def execute(self, model, clip, strength):
            return model, clip, strength

    # a V1 mapping lists an old id as a deprecated subclass (V1's DEPRECATED), which the V3 node then runs
    v1 = graph_runtime.schema.comfy_classes(Probe)
    made = comfy_v3.v3_nodes(v1, graph_runtime.schema.comfy_display_names(v1))
    facts["aliases"] = []
    for cls in made:
        schema, info = cls.GET_SCHEMA(), cls.GET_NODE_INFO_V1()
        facts["aliases"].append({
            "id": schema.node_id, "deprecated": info["deprecated"], "display_name": info["display_name"],
            "runs": cls.LOOM_NODE.__name__,
            "inputs": {i.id: type(i).__qualname__ for i in schema.inputs},
            "core_types": [isinstance(schema.inputs[0], io.Model.Input), isinstance(schema.inputs[1], io.Clip.Input)],
            "outputs": info["output"], "ran": list(comfy_call(cls, "execute", model="m", clip="c", strength=0.5).args)})
    return facts


def main(pack: str, scratch: str) -> None:
    loaded, ours, module, log = load(pack)
    from comfy_api.internal import _ComfyNodeInternal

    facts = {"loaded": loaded, "v3": sorted(k for k, v in ours.items() if issubclass(v, _ComfyNodeInternal)),
             "v1": sorted(k for k, v in ours.items() if not issubclass(v, _ComfyNodeInternal)),
             "module_mappings": type(getattr(module, "NODE_CLASS_MAPPINGS", None)).__name__,
             "log": [line for line in log if "LORALOOM" in line or "loraloom" in line.lower()]}
    if facts["v3"]:
        facts.update(v3_facts(ours, module, Path(scratch)))
    print("FACTS " + json.dumps(facts, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
