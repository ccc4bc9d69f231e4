"""Our node ids inside real ComfyUI (see conftest.py): the nodes register under the LoraLoom ids with
"Loom" display names, no core node is shadowed (ComfyUI drops a pack's node whose id core has, but
applies every display name it is given), the old ids are listed as deprecated and a prompt written
with them runs, as does the API form of a workflow saved before the rename."""

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from loraloom.nodes import registry

OURS = "custom_nodes.loraloom"
OLD_WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "old_ids" / "blend_api.json"
DEMO_LORAS = Path(__file__).resolve().parents[2] / "workflows" / "loras"


def test_inside_comfyui_our_nodes_have_the_new_ids_loom_names_and_old_ids_deprecated(comfyui):
    status, info = comfyui.call("GET", "/object_info")
    assert status == 200
    ours = {k: v for k, v in info.items() if v["python_module"] == OURS}
    core = {k: v for k, v in info.items() if not v["python_module"].startswith("custom_nodes.")}
    ids, aliases = set(registry()) - {"SaveImage", "PreviewImage"}, set(registry().aliases())
    inside_only = {"LoraLoomSweepGridCells", "SweepGridCells", "LoraLoomApplyLoRA"}  # registered only in ComfyUI
    assert ids | aliases | inside_only == set(ours), sorted(ours)
    for name, entry in ours.items():
        assert entry["display_name"].startswith("Loom "), f"{name}: {entry['display_name']!r}"
        assert entry.get("deprecated", False) is (name in aliases or name == "SweepGridCells"), name
    core_names = {v["display_name"] for v in core.values()}
    assert not core_names & {v["display_name"] for v in ours.values()}, "no display name of ours is a core node's"
    assert "Load LoRA" in core_names, "core's own LoRA loader keeps its name"
    for name in ("SaveImage", "PreviewImage", "LoraLoader", "CheckpointLoaderSimple", "KSampler"):
        assert info[name]["python_module"] == "nodes", f"core's {name} is core's"
    assert info["SaveImage"]["display_name"] == "Save Image"
    assert info["LoadLoRA"]["input"] == info["LoraLoomLoadLoRA"]["input"], "an old id is the same node"


def _pixels(comfyui, done, node_id):
    image = done["outputs"][node_id]["images"][0]
    with Image.open(comfyui.base / "output" / image["subfolder"] / image["filename"]) as png:
        return np.asarray(png)


def test_inside_comfyui_an_old_id_prompt_runs_as_the_new_ids_do(comfyui, prompts):
    def prompt(load, sample, seed):
        return {"1": prompts.full(load, source="tiny-sd15", config="auto", dtype="fp32", device="cpu"),
                "2": prompts.full(sample, model=["1", 0], prompt="ids", steps=2, width=64, height=64,
                                  guidance=5.0, scheduler="euler", seed=seed),
                "3": prompts.save_image(["2", 0])}

    old = comfyui.run(prompt("LoadBase", "Sample", 7))
    assert old["status"]["status_str"] == "success", old["status"]
    new = comfyui.run(prompt("LoraLoomLoadBase", "LoraLoomSample", 7))
    assert new["status"]["status_str"] == "success", new["status"]
    assert np.array_equal(_pixels(comfyui, old, "3"), _pixels(comfyui, new, "3")), "the same node, the same image"


def test_inside_comfyui_a_workflow_saved_with_the_old_ids_runs(comfyui):
    loras = comfyui.base / "models" / "loras"
    prompt = json.loads(OLD_WORKFLOW.read_text())
    for entry in prompt.values():
        if entry["class_type"] == "LoadLoRA":
            shutil.copy(DEMO_LORAS / entry["inputs"]["lora_name"], loras)
    prompt["1"]["inputs"].update(dtype="fp32", device="cpu")
    prompt["5"]["inputs"].update(steps=2, width=64, height=64)
    assert {e["class_type"] for e in prompt.values()} >= {"LoadBase", "LoadLoRA", "WeightedBlend", "Sample"}
    done = comfyui.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    assert _pixels(comfyui, done, "6").shape == (64, 64, 3)
