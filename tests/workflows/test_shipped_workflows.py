"""The shipped workflows: both formats agree, each validates, and they run as shipped."""

import json
from pathlib import Path

import pytest

from loraloom import Runtime
from loraloom.cli import main

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json") if not p.stem.endswith("_api"))


def test_every_workflow_ships_in_both_formats():
    assert {"blend", "merge_dare", "fuse_compile", "flux_blend", "flux_merge"} <= set(NAMES), NAMES
    for name in NAMES:
        assert (WORKFLOWS / "api" / f"{name}_api.json").is_file(), f"{name}: API format missing"


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_formats_agree_and_validate(name, tmp_path):
    rt = Runtime(lora_dirs=[tmp_path], output_dir=tmp_path / "out", demo_loras=True)
    ui = rt.validate(WORKFLOWS / f"{name}.json")
    api = rt.validate(WORKFLOWS / "api" / f"{name}_api.json")
    assert ui.nodes == api.nodes, f"{name}: the UI file must mean exactly what the API file means"
    assert ui.outputs, f"{name}: must have an output node"


def test_blend_runs_headless_and_embeds_the_workflow(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    code = main(["run", str(WORKFLOWS / "blend.json"), "--no-progress", "--set", "5.steps=3", "--set", "5.width=64",
                 "--set", "5.height=64"])
    assert code == 0, capsys.readouterr().err
    png = tmp_path / "output" / "blend_00001_.png"
    assert png.is_file(), "the default output folder is ./output"
    text = Image.open(png).text
    assert json.loads(text["prompt"])["4"]["class_type"] == "LoraLoomWeightedBlend"
    assert json.loads(text["workflow"])["version"] == 0.4, "a UI workflow is embedded as ComfyUI does"


def test_sweep_grid_runs_headless_and_saves_the_grid(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    code = main(["run", str(WORKFLOWS / "sweep_grid.json"), "--no-progress", "--set", "5.steps=2"])
    assert code == 0, capsys.readouterr().err
    (sweep,) = (tmp_path / "output" / "sweeps").iterdir()
    assert len(list((sweep / "cells").iterdir())) == 6 and (sweep / "manifest.jsonl").is_file()
    with Image.open(sweep / "grid.png") as grid, Image.open(tmp_path / "output" / "sweep_grid_00001_.png") as saved:
        assert grid.size == saved.size and grid.width > 3 * 64, "the saved grid is the sweep's, 3 x 2 cells"
        assert json.loads(saved.text["prompt"])["6"]["class_type"] == "LoraLoomSweepGrid", "it embeds the sweep workflow"


def test_demo_loras_stay_out_of_a_users_lora_list(tmp_path):
    from loraloom.nodes.common import list_loras

    (tmp_path / "mine.safetensors").write_bytes(b"")
    own = Runtime(lora_dirs=[tmp_path], output_dir=tmp_path / "out")
    with own.context():
        assert list_loras() == ["mine.safetensors"], "the demo LoRAs must not show in a user's own list"
    options = own.object_info()["LoadLoRA"]["input"]["required"]["lora_name"][0]
    assert options == ["mine.safetensors"], options
    demo = Runtime(lora_dirs=[tmp_path], output_dir=tmp_path / "out", demo_loras=True)
    with demo.context():
        assert list_loras() == ["demo-a.safetensors", "demo-b.safetensors", "demo-flux-diffusers.safetensors",
                                "demo-flux-kohya.safetensors", "demo-red.safetensors", "demo-stripes.safetensors",
                                "mine.safetensors"]
    assert own.folders.lora_dirs == [tmp_path], "turning demo LoRAs on elsewhere must not change this runtime"


def test_demo_loras_never_change_the_callers_folders(tmp_path):
    from loraloom.api import DEMO_LORA_DIR
    from loraloom.graph_runtime import Folders

    mine = Folders([tmp_path], tmp_path / "models", tmp_path / "out")
    rt = Runtime(folders=mine, demo_loras=True)
    assert mine.lora_dirs == [tmp_path], "the caller's Folders is theirs"
    assert rt.folders.lora_dirs == [tmp_path, DEMO_LORA_DIR], "the demo folder comes after the user's own"


def test_cli_finds_demo_loras_for_shipped_workflows_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(WORKFLOWS / "api" / "blend_api.json")]) == 0, capsys.readouterr().err
    same = tmp_path / "blend_api.json"
    same.write_bytes((WORKFLOWS / "api" / "blend_api.json").read_bytes())
    assert main(["validate", str(same)]) == 0, "an unchanged copy (a clone beside an installed package) is shipped"
    copy = tmp_path / "my_blend.json"
    copy.write_text((WORKFLOWS / "api" / "blend_api.json").read_text())
    assert main(["validate", str(copy)]) == 1, "a user's own workflow sees only the user's LoRA folders"
    assert "demo-a.safetensors" in capsys.readouterr().err
    assert main(["validate", str(copy), "--lora-dir", str(WORKFLOWS / "loras")]) == 0, capsys.readouterr().err


def test_the_flux_demo_loras_are_what_fixtures_demo_writes_in_two_layouts(tmp_path):
    from loraloom.fixtures import FLUX_DEMO_LORAS, main as fixtures_main
    from loraloom.lora.readers import read_lora

    assert fixtures_main([str(tmp_path), "--demo"]) == 0
    for name in ["demo-a", "demo-b", *FLUX_DEMO_LORAS]:
        shipped = (WORKFLOWS / "loras" / f"{name}.safetensors").read_bytes()
        assert (tmp_path / f"{name}.safetensors").read_bytes() == shipped, \
            f"workflows/loras/{name}.safetensors is stale: regenerate with `loraloom fixtures workflows/loras --demo`"
    kohya, diffusers = (read_lora(WORKFLOWS / "loras" / f"{name}.safetensors") for name in FLUX_DEMO_LORAS)
    assert (kohya.source_format, diffusers.source_format) == ("kohya-flux", "diffusers")
    blocks = {p.split(".")[0] + "." + p.split(".")[1] for p in kohya.components["transformer"] if "blocks." in p}
    assert len(blocks) == 19 + 38, "every double and single block, so block weights have something to act on"


@pytest.mark.parametrize("name, sampler", [("flux_blend", "5"), ("flux_merge", "7")])
def test_the_flux_workflows_run_headless_as_shipped(name, sampler, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from loraloom.lora.readers import read_lora

    monkeypatch.chdir(tmp_path)
    code = main(["run", str(WORKFLOWS / f"{name}.json"), "--no-progress", "--set", f"{sampler}.steps=2",
                 "--set", f"{sampler}.width=64", "--set", f"{sampler}.height=64"])
    assert code == 0, capsys.readouterr().err
    image = Image.open(tmp_path / "output" / f"{name}_00001_.png")
    assert image.size == (64, 64)
    assert json.loads(image.text["prompt"])["1"]["inputs"]["source"] == "tiny-flux"
    if name == "flux_merge":
        merged = read_lora(tmp_path / "output" / "loras" / "demo-flux-merged_00001_.safetensors")
        assert merged.source_format == "kohya-flux", "SaveLoRA kohya writes kohya's Flux layout"
        assert set(merged.components) == {"transformer", "text_encoder", "text_encoder_2"}
