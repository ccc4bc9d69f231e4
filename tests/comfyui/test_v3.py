"""Our nodes through ComfyUI's V3 node API (comfy_entrypoint, io.ComfyNode), side by side with the V1
registration (NODE_CLASS_MAPPINGS) in a second ComfyUI started with LORALOOM_COMFY_NODES=v1: the
same nodes, widgets and outputs in /object_info, the same runs, refusals, text and caching."""

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import BAD_VALUES, comfyui_base, node_errors, start_comfyui, sweep_folder

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Every shipped workflow runs through V3 in test_workflows.py (the session's ComfyUI takes the pack through
# V3); here two of them (a blend with its recipe text, a merge with its report) also run through V1, to
# compare: running all of them twice would add minutes (a cold torch.compile per server) and no new path.
WORKFLOWS = [ROOT / "workflows" / "api" / name for name in ("blend_api.json", "merge_dare_api.json")]
CATEGORY = "LoRA Loom"


def add_demo_loras(base: Path) -> None:
    """The LoRAs the shipped workflows name, in the server's LoRA folder."""
    for path in (ROOT / "workflows" / "loras").glob("*.safetensors"):
        target = base / "models" / "loras" / path.name
        if not target.exists():
            shutil.copy(path, target)


@pytest.fixture(scope="module")
def v3(comfyui):
    """The session's ComfyUI (which takes the pack through V3: ComfyUI 0.3.64 has the V3 API)."""
    add_demo_loras(comfyui.base)
    return comfyui


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """A second ComfyUI with the pack forced onto the V1 API."""
    base = tmp_path_factory.mktemp("comfyui-v1")
    server = start_comfyui(base, comfyui_base(base), env={"LORALOOM_COMFY_NODES": "v1"})
    running = next(server)
    add_demo_loras(base)
    yield running
    next(server, None)


def ours(server) -> dict:
    """/object_info of our nodes."""
    info = server.call("GET", "/object_info")[1]
    return {nid: entry for nid, entry in info.items() if entry["category"].split("/")[0] == CATEGORY}


def as_v1(entry: dict) -> dict:
    """A V3 node's /object_info entry in V1's shape, without what V3 adds: a COMBO is ("COMBO",
    {"options": [...], "multiselect": false}) in V3 and ([...], {...}) in V1; V3 gives every output node
    the hidden PROMPT and EXTRA_PNGINFO; a link with no options is [type, {}] in V3 and [type] in V1;
    an output without a tooltip is null in V3 and "" in V1; V3 always says deprecated / experimental /
    api_node. The hidden inputs are compared apart."""
    entry = copy.deepcopy(entry)
    for group in entry["input"].values():
        for name, spec in group.items():
            if spec[1:] == [{}]:
                group[name] = spec[:1]
            elif spec[0] == "COMBO":
                options = dict(spec[1])
                listed = options.pop("options")
                options.pop("multiselect", None)
                group[name] = [listed, options]
    entry["output_tooltips"] = [tip or "" for tip in entry["output_tooltips"]]
    for key in ("deprecated", "experimental", "api_node"):
        if not entry.get(key):
            entry.pop(key, None)
    return without_hidden(entry)


def without_hidden(entry: dict) -> dict:
    """``entry`` without its hidden inputs (a copy)."""
    entry = copy.deepcopy(entry)
    entry["input"].pop("hidden", None)
    entry["input_order"].pop("hidden", None)
    return entry


def same_files(*servers) -> None:
    """Give each server's models and saved LoRAs the files the others have (the COMBO lists read them;
    tests before this one may have added some to one server)."""
    for kind in ("models", "output/loras"):
        for source in servers:
            for path in sorted((source.base / kind).rglob("*")):
                for target in servers:
                    copy_to = target.base / kind / path.relative_to(source.base / kind)
                    if path.is_dir():
                        copy_to.mkdir(parents=True, exist_ok=True)
                    elif not copy_to.exists():
                        copy_to.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(path, copy_to)


def test_v3_registers_the_same_nodes_widgets_and_outputs_as_v1(v3, v1):
    same_files(v3, v1)
    theirs_v3, theirs_v1 = ours(v3), ours(v1)
    assert theirs_v3["LoadLoRA"]["input"]["required"]["lora_name"][0] == "COMBO", \
        "the session's ComfyUI took the pack through V3 (V3 COMBOs are typed COMBO)"
    assert isinstance(theirs_v1["LoadLoRA"]["input"]["required"]["lora_name"][0], list), "and this one through V1"
    assert set(theirs_v3) == set(theirs_v1) and len(theirs_v3) >= 12, sorted(theirs_v3)
    for nid in sorted(theirs_v1):
        seen, expected = as_v1(theirs_v3[nid]), without_hidden(theirs_v1[nid])
        differ = {key: (seen.get(key), expected.get(key)) for key in set(seen) | set(expected)
                  if seen.get(key) != expected.get(key)}
        assert not differ, f"{nid}: V3 registers it as V1 does; (V3, V1) differ in {differ}"
        hidden_v1 = set(theirs_v1[nid]["input"].get("hidden", {}))
        assert hidden_v1 <= set(theirs_v3[nid]["input"].get("hidden", {})), f"{nid}: V3 takes V1's hidden inputs"
    # the parts where a difference matters most, said plainly
    merge = theirs_v3["PeftMerge"]["input"]["required"]
    assert merge["seed"][1]["control_after_generate"] is True
    assert merge["seed"][1]["loraloom_control_after_generate"] == "fixed", "the editor extension's start mode"
    images = theirs_v3["SweepGrid"]["input"]["required"]["images"]
    assert images[0] == "IMAGE" and images[1]["lazy"] is True and images[1]["rawLink"] is True
    assert theirs_v3["Sample"]["output"] == ["IMAGE"], "ComfyUI's own IMAGE: its Save/Preview Image take it"


def test_v3_refuses_bad_values_when_queued_with_our_messages(v3, prompts):
    prompt = prompts.bad_values(v3.names["tiny-sd15/kohya"],
                                prompts.full("LoadBase", source="tiny-sd15", config="auto", dtype="fp64", device="cpu"))
    prompt.update({"18": prompts.full("WeightedBlend", model=["1", 0], lora=["12", 0], weight=11.0),
                   "19": prompts.sample(["18", 0]), "20": prompts.save_image(["19", 0])})
    status, body = v3.call("POST", "/prompt", {"prompt": prompt})
    assert status == 400, body
    errors = node_errors(body)
    expected = {**BAD_VALUES, "9": "input 'dtype'", "18": "input 'weight': 11.0 is above max 10.0"}
    for nid, text in expected.items():
        assert text in errors.get(nid, ""), f"node {nid}: {errors.get(nid)}"
    assert "Fix: give a name relative to ComfyUI/output" in errors["13"], errors["13"]
    assert set(errors) == set(expected), f"only the bad nodes are refused: {errors}"


def api_prompt(path: Path) -> dict:
    """A shipped API workflow, sampled in 2 steps (what is compared is V1 against V3, not the picture)."""
    prompt = json.loads(path.read_text())
    for entry in prompt.values():
        if entry["class_type"] == "Sample":
            entry["inputs"]["steps"] = 2
    return prompt


def outputs_of(server, done: dict) -> dict:
    """Each node's UI output, images read back as pixels, the time a merge took left out of its report."""
    result = {}
    for nid, out in done["outputs"].items():
        shown = {key: value for key, value in out.items() if key != "images"}
        if "text" in out:
            shown["text"] = [re.sub(r" in [0-9.]+ s\b", " in _ s", line) for line in out["text"]]
        if "images" in out:
            shown["images"] = [np.asarray(Image.open(server.base / image["type"] / image["subfolder"]
                                                     / image["filename"]).convert("RGB")).tolist()
                               for image in out["images"]]
        result[nid] = shown
    return result


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_a_shipped_workflow_runs_through_v3_as_through_v1(v3, v1, path):
    """Same images and the same text on the nodes, through either API."""
    prompt = api_prompt(path)
    runs = {}
    for name, server in (("v3", v3), ("v1", v1)):
        done = server.run(prompt, timeout=900)
        assert done["status"]["status_str"] == "success", f"{name}: {done['status']}"
        runs[name] = outputs_of(server, done)
    assert runs["v3"] == runs["v1"], f"{path.name}: V3 and V1 runs differ"
    assert any(out.get("images") for out in runs["v3"].values()), f"{path.name}: an image was saved"
    assert any(out.get("text") for out in runs["v3"].values()), f"{path.name}: our nodes' text reaches the history"


def test_text_on_the_node_reaches_comfyuis_history_through_v3(v3, prompts):
    lora = v3.names["tiny-sd15/kohya"]
    prompt = {"1": prompts.base(), "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora}},
              "3": prompts.full("WeightedBlend", model=["1", 0], lora=["2", 0], weight=0.4),
              "4": prompts.full("Fuse", model=["3", 0]), "5": prompts.sample(["4", 0], steps=1),
              "6": prompts.save_image(["5", 0])}
    done = v3.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    text = {nid: out.get("text") for nid, out in done["outputs"].items()}
    assert text["2"] and text["2"][0].startswith(f"{lora}: "), text
    assert text["3"] and "0.4" in text["3"][0], f"the blend recipe names its weight: {text}"
    assert text["4"] and all(isinstance(line, str) for line in text["4"]), text


def cached_nodes(done: dict) -> set:
    """The nodes a run took from ComfyUI's cache (its status messages say which)."""
    return {nid for kind, data in done["status"]["messages"] if kind == "execution_cached" for nid in data["nodes"]}


def test_v3_caches_a_second_identical_prompt_and_reruns_only_what_a_change_reaches(v3, prompts):
    prompt = prompts.blend(v3.names["tiny-sd15/kohya"], 0.3, steps=1, seed=11)
    first = v3.run(prompt)
    assert first["status"]["status_str"] == "success", first["status"]
    again = v3.run(prompt)
    cached = cached_nodes(again)
    assert {"1", "2", "3", "4"} <= cached, f"a second identical prompt runs nothing of ours: cached {cached}"
    prompt["3"]["inputs"]["weight"] = 0.35
    changed = v3.run(prompt)
    cached = cached_nodes(changed)
    assert {"1", "2"} <= cached and not {"3", "4"} & cached, f"only the blend and what it feeds re-run: {cached}"


def test_a_sweep_grid_expands_through_v3(v3, prompts):
    done = v3.run(prompts.sweep_grid(v3.names["tiny-sd15/kohya"], weights=(0.1, 0.9), seeds=(3, 4), steps=1))
    folder = sweep_folder(v3, done)
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [r["overrides"] for r in records] == [{"3.weight": 0.1, "4.seed": 3}, {"3.weight": 0.9, "4.seed": 3},
                                                 {"3.weight": 0.1, "4.seed": 4}, {"3.weight": 0.9, "4.seed": 4}], records
    grid = np.asarray(Image.open(folder / "grid.png").convert("RGB"))
    (saved,) = done["outputs"]["6"]["images"]
    assert np.asarray(Image.open(v3.base / "output" / saved["subfolder"] / saved["filename"]).convert("RGB")).shape \
        == grid.shape, "the grid is the node's output (what ComfyUI's SaveImage saved)"
