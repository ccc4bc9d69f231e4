"""A workflow saved before the nodes were renamed (old_ids/: workflows/blend as it shipped with the
ids LoadBase, LoadLoRA, WeightedBlend, Sample) still validates and runs headless, means exactly what
the renamed shipped file means, and shares its cache keys and its image."""

import json
from pathlib import Path

import pytest

from loraloom import Runtime
from loraloom.cli import main
from loraloom.nodes import registry

HERE = Path(__file__).resolve().parent
OLD = HERE / "old_ids"
WORKFLOWS = HERE.parents[1] / "workflows"
SMALL = {"5.steps": 2, "5.width": 64, "5.height": 64}


def test_the_old_file_is_the_shipped_file_under_the_old_ids():
    old, new = (json.loads(p.read_text()) for p in (OLD / "blend_api.json", WORKFLOWS / "api" / "blend_api.json"))
    assert {e["class_type"] for e in old.values()} == {"LoadBase", "LoadLoRA", "WeightedBlend", "Sample", "SaveImage"}
    renamed = {nid: {"class_type": registry().canonical(e["class_type"]), "inputs": e["inputs"]} for nid, e in old.items()}
    assert renamed == {nid: {"class_type": e["class_type"], "inputs": e["inputs"]} for nid, e in new.items()}, \
        "the shipped blend workflow changed: the old-id copy must stay the same graph"
    assert all(e["class_type"].startswith("LoraLoom") for e in new.values() if e["class_type"] != "SaveImage")


@pytest.mark.parametrize("name, shipped", [("blend.json", "blend.json"), ("blend_api.json", "api/blend_api.json")])
def test_old_ids_validate_as_the_renamed_file_with_the_same_cache_keys(name, shipped, tmp_path):
    rt = Runtime(output_dir=tmp_path, demo_loras=True)
    old, new = rt.validate(OLD / name), rt.validate(WORKFLOWS / shipped)
    assert old.outputs == new.outputs and set(old.nodes) == set(new.nodes)
    assert [old.nodes[n]["inputs"] for n in sorted(old.nodes)] == [new.nodes[n]["inputs"] for n in sorted(new.nodes)]
    assert rt.node_keys(old) == rt.node_keys(new), "an old id keys its node as the new id does"


def test_old_ids_run_headless_and_the_renamed_file_finds_their_results(tmp_path):
    import torch

    rt = Runtime(output_dir=tmp_path, demo_loras=True)
    old = rt.run(OLD / "blend_api.json", overrides=SMALL)
    assert sorted(old.executed) == ["1", "2", "3", "4", "5", "6"]
    new = rt.run(WORKFLOWS / "api" / "blend_api.json", overrides=SMALL)
    assert new.executed == [], "nothing runs again: every node, the save too, is the old run's"
    assert new.outputs == old.outputs
    fresh = Runtime(output_dir=tmp_path / "fresh", demo_loras=True).run(WORKFLOWS / "api" / "blend_api.json", overrides=SMALL)
    assert torch.equal(old.value("5"), fresh.value("5")), "the old ids give the image the new ids give"


def test_cli_validates_and_runs_an_old_id_ui_workflow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    loras = ["--lora-dir", str(WORKFLOWS / "loras")]
    assert main(["validate", str(OLD / "blend.json"), *loras]) == 0, capsys.readouterr().err
    args = [f"--set={k}={v}" for k, v in SMALL.items()]
    assert main(["run", str(OLD / "blend.json"), "--no-progress", *args, *loras]) == 0, capsys.readouterr().err
    assert (tmp_path / "output" / "blend_00001_.png").is_file()
