"""Every shipped API workflow runs through real ComfyUI's executor (see conftest.py for when these run).

The workflows are found, not listed: every JSON file under workflows/ (subfolders included) that is
in the API format. Each runs in the session's one ComfyUI and must end with status success, having
written what its saving nodes save: every node with a ``filename_prefix`` (ComfyUI's SaveImage, our
SaveLoRA, SavePipeline...) leaves a new image, LoRA file or folder named by that prefix, and every
image ComfyUI reports is a PNG on disk.

Lean on purpose: every ``steps`` input is set to `STEPS` (the shipped files take 20; two steps run
the same nodes and code paths) and ComfyUI's EmptyLatentImage to `LATENT` px. Nothing else in a
workflow changes; the files it names are put where ComfyUI finds them (see `workflow_files`).
"""

import copy
import json
import shutil
from pathlib import Path

import pytest

from .conftest import ROOT

STEPS = 2
LATENT = 64


def api_workflows() -> list[Path]:
    """The shipped workflow files in ComfyUI's API format (a node id -> {class_type, inputs} map)."""
    found = []
    for path in sorted((ROOT / "workflows").rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
            found.append(path)
    return found


WORKFLOWS = api_workflows()


def named(key: str) -> set[str]:
    """Every constant value the shipped API workflows give to an input called ``key``."""
    return {entry["inputs"][key] for path in WORKFLOWS for entry in json.loads(path.read_text()).values()
            if isinstance(entry["inputs"].get(key), str)}


def lean(prompt: dict) -> dict:
    """``prompt`` with `STEPS` sampler steps and `LATENT` px empty latents (see the module docstring)."""
    prompt = copy.deepcopy(prompt)
    for entry in prompt.values():
        inputs = entry["inputs"]
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = STEPS
        if entry["class_type"] == "EmptyLatentImage":
            inputs.update(width=LATENT, height=LATENT)
    return prompt


@pytest.fixture(scope="module")
def workflow_files(comfyui, tmp_path_factory):
    """Put the files the workflows name where ComfyUI lists them: the demo LoRAs (workflows/loras) in
    its ``loras`` folder under their own names; a checkpoint a ComfyUI workflow names is the tiny SD1.5
    checkpoint ComfyUI's core loader reads (`fixtures.write_comfy_checkpoint`), and a LoRA name that is
    not a demo LoRA gets one of that checkpoint's LoRAs (`fixtures.write_comfy_loras`), in name order."""
    from loraloom import fixtures

    models = comfyui.base / "models"
    demos = {path.name: path for path in (ROOT / "workflows" / "loras").glob("*.safetensors")}
    missing = sorted(name for name in named("lora_name") if not (models / "loras" / name).exists())
    stand_ins = []
    if any(name not in demos for name in missing):
        stand_ins = sorted(fixtures.write_comfy_loras(tmp_path_factory.mktemp("comfy-loras")).values())
    for name in missing:
        source = demos.get(name) or (stand_ins.pop(0) if stand_ins else None)
        assert source is not None, f"no file to stand in for the LoRA {name!r} that a shipped workflow names"
        (models / "loras" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, models / "loras" / name)
    checkpoints = sorted(name for name in named("ckpt_name") if not (models / "checkpoints" / name).exists())
    if checkpoints:
        first, _ = fixtures.write_comfy_checkpoint(models / "checkpoints" / checkpoints[0])
        for name in checkpoints[1:]:
            (models / "checkpoints" / name).symlink_to(first)


def check_saved(path: Path, node: str) -> None:
    """A file or folder a saving node wrote is whole: a PNG opens, a safetensors file has tensors, a
    folder is not empty."""
    if path.is_dir():
        assert any(path.iterdir()), f"node {node} wrote an empty folder {path}"
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            image.verify()
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            assert list(f.keys()), f"node {node} wrote a LoRA file with no tensors: {path}"


def test_the_shipped_api_workflows_are_found():
    """The glob finds the shipped API files (and only those): each `*_api.json` under workflows/."""
    names = {path.relative_to(ROOT / "workflows").as_posix() for path in WORKFLOWS}
    assert {"api/blend_api.json", "api/sweep_grid_api.json", "comfyui/merge_on_checkpoint_api.json"} <= names, names
    assert all(name.endswith("_api.json") for name in names), names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.relative_to(ROOT / "workflows").as_posix())
def test_a_shipped_api_workflow_runs_inside_comfyui(comfyui, workflow_files, path):
    prompt = lean(json.loads(path.read_text(encoding="utf-8")))
    before = set(comfyui.base.rglob("*"))
    done = comfyui.run(prompt, timeout=900)
    assert done["status"]["status_str"] == "success", done["status"]

    made = set(comfyui.base.rglob("*")) - before
    for nid, entry in prompt.items():
        prefix = entry["inputs"].get("filename_prefix")
        if not isinstance(prefix, str):
            continue
        stem = Path(prefix).name + "_"
        saved = [p for p in made if p.name.startswith(stem) and not any(q.name.startswith(stem) for q in p.parents)]
        assert saved, f"node {nid} ({entry['class_type']}) saved nothing named {stem}*: new were {sorted(made)}"
        for item in saved:
            check_saved(item, nid)

    images = [image for out in done["outputs"].values() for image in out.get("images", [])]
    assert images or not any(e["class_type"] == "SaveImage" for e in prompt.values()), done["outputs"]
    for image in images:
        assert (comfyui.base / image["type"] / image["subfolder"] / image["filename"]).is_file(), image
