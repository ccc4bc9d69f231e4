"""Our pack inside real ComfyUI: queue-time checks, runs, errors, the sweep grid (see conftest.py)."""

import json

from .conftest import BAD_VALUES, node_errors, sweep_folder


def test_inside_comfyui_bad_values_are_refused_when_queued_with_our_messages(comfyui, prompts):
    prompt = prompts.bad_values(comfyui.names["tiny-sd15/kohya"], prompts.base("model.safetensors"))
    status, body = comfyui.call("POST", "/prompt", {"prompt": prompt})
    assert status == 400, body
    errors = node_errors(body)
    expected = {**BAD_VALUES, "9": "input 'config': model.safetensors: the file is empty"}
    for nid, text in expected.items():
        assert text in errors.get(nid, ""), f"node {nid}: {errors.get(nid)}"
    assert "Fix: give a name relative to ComfyUI/output" in errors["13"], errors["13"]
    assert "LORALOOM_MAX_TEXT_CHARS=N" in errors["16"] and "--max" not in errors["16"], errors["16"]
    assert set(errors) == set(expected), f"only the bad nodes are refused: {errors}"


def test_inside_comfyui_a_good_prompt_runs_and_a_saved_lora_loads_next_time(comfyui, prompts):
    lora = comfyui.names["tiny-sd15/kohya"]
    prompt = prompts.blend(lora, 0.8)
    prompt["6"] = prompts.full("SaveLoRA", lora=["2", 0], filename_prefix="loras/again", dtype="fp32")
    done = comfyui.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    image = done["outputs"]["5"]["images"][0]
    assert (comfyui.base / "output" / image["subfolder"] / image["filename"]).is_file()

    saved = "again_00001_.safetensors"  # in ComfyUI's loras folder, where every LoRA loader looks
    offered = comfyui.combo_options("LoadLoRA", "lora_name")
    assert saved in offered and lora in offered, offered
    prompt["2"]["inputs"]["lora_name"] = saved
    prompt["4"]["inputs"]["seed"] = 2
    again = comfyui.run(prompt)
    assert again["status"]["status_str"] == "success", again["status"]


def test_inside_comfyui_a_failing_node_names_our_error_type_not_a_path(comfyui, prompts):
    prompt = prompts.blend(comfyui.names["tiny-sdxl/kohya"], 0.8)
    done = comfyui.run(prompt)
    errors = [data for kind, data in done["status"]["messages"] if kind == "execution_error"]
    assert errors, done["status"]
    assert errors[0]["exception_type"] == "loraloom.LoRAMatchError", errors[0]["exception_type"]
    assert "Fix: load it on an SDXL base" in errors[0]["exception_message"], errors[0]["exception_message"]


def test_inside_comfyui_a_sweep_grid_expands_into_its_cells_and_draws_our_grid(comfyui, prompts, tmp_path):
    """SweepGrid inside ComfyUI expands into one copy of what feeds its image per cell and a node that
    draws the grid: the grid is the one our runtime draws for the same workflow, bit for bit. (It is so
    because ComfyUI's torch runs with this process's thread count, see `start_comfyui`: with torch's
    default of one thread per core there, 8 of the grid's values differed by one level.)"""
    import numpy as np
    from PIL import Image

    from loraloom.api import Runtime

    prompt = prompts.sweep_grid(comfyui.names["tiny-sd15/kohya"], weights=(0.2, 0.8), seeds=(1, 2))
    folder = sweep_folder(comfyui, comfyui.run(prompt))
    theirs = np.asarray(Image.open(folder / "grid.png").convert("RGB"))
    assert len((folder / "manifest.jsonl").read_text().splitlines()) == 4

    ours = Runtime(lora_dirs=[comfyui.base / "models" / "loras"], output_dir=tmp_path).run(prompt)
    ref = ours.outputs["5"]["images"][0]
    expected = np.asarray(Image.open(tmp_path / ref["subfolder"] / ref["filename"]).convert("RGB"))
    assert theirs.shape == expected.shape
    assert np.array_equal(theirs, expected), f"{(theirs != expected).sum()} values differ"


def test_inside_comfyui_a_sweep_grid_sets_inputs_of_comfyuis_own_nodes_typed(comfyui, prompts):
    """An axis on one of ComfyUI's own nodes (ImageScaleBy's FLOAT scale_by) gets numbers, not text."""
    import json

    prompt = {"1": prompts.base(), "2": prompts.sample(["1", 0]),
              "3": {"class_type": "ImageScaleBy", "inputs": {"image": ["2", 0], "upscale_method": "nearest-exact",
                                                             "scale_by": 1.0}},
              "4": prompts.full("SweepGrid", images=["3", 0], x_axis="3.scale_by=0.5,1"),
              "5": prompts.save_image(["4", 0])}
    done = comfyui.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    (grid,) = [image for out in done["outputs"].values() for image in out.get("images", [])
               if image["subfolder"].startswith("sweeps/")]
    folder = comfyui.base / "output" / grid["subfolder"]
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [r["overrides"] for r in records] == [{"3.scale_by": 0.5}, {"3.scale_by": 1.0}]


def test_comfyuis_template_browser_offers_our_editor_workflows_and_each_opens(comfyui):
    # ComfyUI lists every .json at the top of a pack's workflows/ folder as a template, and its
    # browser opens only the editor's format: the API files live in workflows/api/ for that reason
    import urllib.request
    from pathlib import Path

    status, listed = comfyui.call("GET", "/api/workflow_templates")
    assert status == 200, listed
    names = sorted(listed.get("loraloom", []))
    shipped = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
    assert names == shipped and "blend" in names, (names, shipped)
    for name in names:
        with urllib.request.urlopen(f"{comfyui.url}/api/workflow_templates/loraloom/{name}.json", timeout=30) as r:
            workflow = json.loads(r.read())
        assert isinstance(workflow.get("nodes"), list) and workflow["nodes"], f"{name}: not an editor workflow"
        with urllib.request.urlopen(f"{comfyui.url}/api/workflow_templates/loraloom/{name}.jpg", timeout=30) as r:
            assert r.headers["Content-Type"] == "image/jpeg", f"{name}: the browser's thumbnail"
