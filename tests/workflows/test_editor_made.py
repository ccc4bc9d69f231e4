"""Workflows made in the shipped editor (tests/workflows/editor/, re-made by tests/server/test_browser.py):
a nested subgraph with a promoted widget, a bypassed node and native reroutes; one subgraph used twice
with its promoted widget set differently, a bypassed subgraph node, a legacy Reroute and PrimitiveNode and a
muted node; a PrimitiveNode on a promoted input; a subgraph node saved the older way (proxyWidgets). Each
is stored as the editor's Save writes it (a 0.4 root, 1.0 subgraph definitions) and, but the older one, in
the 1.0 schema, with the prompt the editor queued for it: our conversion must give exactly that prompt,
and it runs headless from the CLI and from Python."""

import json
from pathlib import Path

import pytest

from loraloom import Runtime
from loraloom.cli import main
from loraloom.graph_runtime.workflow import load_workflow, ui_to_api

EDITOR = Path(__file__).resolve().parent / "editor"
DEMO_LORAS = Path(__file__).resolve().parents[2] / "workflows" / "loras"  # demo-a and demo-b
NAMES = sorted(p.stem.removesuffix("_prompt") for p in EDITOR.glob("*_prompt.json"))
FORMS = {"saved": "", "1.0": "_v1"}
SMALL = {"5.steps": 2, "5.width": 64, "5.height": 64}  # Sample is node 5 at the root of each


def _ours(entry: dict) -> str:
    """A node's class without the "LoraLoom" prefix of our canonical ids (the old ids are its aliases)."""
    return entry["class_type"].removeprefix("LoraLoom")


def _prompt(name: str) -> dict:
    return json.loads((EDITOR / f"{name}_prompt.json").read_text())


def test_the_editor_made_files_cover_what_they_should():
    assert NAMES == ["subgraph_nested", "subgraph_primitive", "subgraph_proxy_widgets", "subgraph_twice"], NAMES
    nested = json.loads((EDITOR / "subgraph_nested_v1.json").read_text())
    assert nested["version"] == 1 and isinstance(nested["links"][0], dict) and nested["reroutes"], \
        "the 1.0 schema: object links and native reroutes at the root"
    assert any(link.get("parentId") for link in nested["links"]), "a link runs through a native reroute"
    assert len(nested["definitions"]["subgraphs"]) == 2, "one subgraph nested in another"
    saved = json.loads((EDITOR / "subgraph_nested.json").read_text())
    assert saved["version"] == 0.4 and saved["extra"]["reroutes"] and saved["extra"]["linkExtensions"], \
        "the editor's Save: a 0.4 root keeps native reroutes in extra"
    assert {"8:4", "8:9:2", "8:9:3"} <= set(_prompt("subgraph_nested")), "ids of nodes inside (nested) subgraphs"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_our_conversion_is_the_prompt_the_editor_queued(name, form):
    rt = Runtime(demo_loras=True)
    if not (EDITOR / f"{name}{FORMS[form]}.json").is_file():
        assert (name, form) == ("subgraph_proxy_widgets", "1.0"), "the older form has no 1.0 file of its own"
        return
    ui = json.loads((EDITOR / f"{name}{FORMS[form]}.json").read_text())
    assert ui_to_api(ui, rt.registry) == _prompt(name), f"{name} ({form})"
    assert load_workflow(EDITOR / f"{name}{FORMS[form]}.json", rt.registry).prompt == _prompt(name)


def test_what_the_editor_resolved_in_the_files():
    """The facts the captured prompts hold, stated: a promoted widget's value is the subgraph node's, a
    widget that is not promoted keeps the inner node's, a bypassed node and a bypassed subgraph node pass
    their input on, each instance of a subgraph gets its own ids and values, a PrimitiveNode's value
    arrives through its link, a legacy Reroute is followed and a muted node is left out."""
    nested, twice = _prompt("subgraph_nested"), _prompt("subgraph_twice")
    blend = nested["8:4"]["inputs"]
    assert (blend["weight"], blend["text_encoder_weight"]) == (0.5, 0.7)
    assert nested["5"]["inputs"]["model"] == ["8:4", 0], "the bypassed Fuse inside the subgraph is passed through"
    assert (blend["lora"], blend["lora_2"]) == (["8:9:2", 0], ["8:9:3", 0])
    assert blend["model"] == ["1", 0], "a link into the subgraph through a native reroute"
    assert {k: v["inputs"]["lora_name"] for k, v in twice.items() if _ours(v) == "LoadLoRA"} == \
        {"7:2": "demo-a.safetensors", "8:2": "demo-b.safetensors"}
    assert twice["4"]["inputs"]["model"] == ["1", 0], "the bypassed subgraph node passes the base through"
    assert twice["5"]["inputs"]["seed"] == 7 and twice["6"]["inputs"]["images"] == ["5", 0]
    assert not any(_ours(v) in ("PreviewImage", "Fuse") for v in twice.values())
    proxied = _prompt("subgraph_proxy_widgets")
    assert (proxied["7:4"]["inputs"]["weight"], proxied["7:3"]["inputs"]["lora_name"]) == \
        (0.25, "demo-a.safetensors"), "widgets promoted the older way (proxyWidgets) take the subgraph node's values"
    assert _prompt("subgraph_primitive")["7:4"]["inputs"]["weight"] == 0.7, \
        "a PrimitiveNode on a promoted input: the editor queues the inner widget's value, not its 0.33"


@pytest.mark.parametrize("name", NAMES)
def test_the_editor_made_workflows_run_headless(name, tmp_path, monkeypatch, capsys):
    """The 1.0 file (the saved one for the older form) through the CLI (validate, run), then the captured
    prompt and the editor's saved file from Python in one Runtime: they are one graph, so the second run
    is a cache hit."""
    monkeypatch.chdir(tmp_path)
    path = EDITOR / f"{name}_v1.json" if name != "subgraph_proxy_widgets" else EDITOR / f"{name}.json"
    loras = ["--lora-dir", str(DEMO_LORAS)]
    assert main(["validate", str(path), *loras]) == 0, capsys.readouterr().err
    sets = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}")]
    assert main(["run", str(path), "--no-progress", *loras, *sets]) == 0, capsys.readouterr().err
    assert list((tmp_path / "output").glob("blend_*.png")), "the SaveImage of the 1.0 file wrote its image"
    rt = Runtime(demo_loras=True, output_dir=tmp_path / "py")
    first = rt.run({"prompt": _prompt(name)}, SMALL)
    assert "5" in first.executed and any(":" in node for node in first.executed), first.executed
    again = rt.run(EDITOR / f"{name}.json", SMALL)
    assert again.executed == [] and again.cached == ["6"], \
        "the editor's saved file is the same graph as the prompt it queued: its output is a cache hit"


def test_a_sweep_on_the_editor_made_file_targets_nodes_inside_subgraphs(tmp_path, capsys):
    """`loraloom sweep` on the saved UI file: an axis names a node inside a nested subgraph by the id the
    editor gives it ("8:4", the WeightedBlend in the outer subgraph)."""
    path = EDITOR / "subgraph_nested.json"
    sets = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}")]
    common = [str(path), "--lora-dir", str(DEMO_LORAS), "--output-dir", str(tmp_path / "out"), "--no-progress", *sets]
    assert main(["sweep", *common, "--axis", "8:4.weight=0,1"]) == 0, capsys.readouterr().err
    assert "2 of 2 cells (2 run, 0 finished before, 0 failed)" in capsys.readouterr().out
    (folder,) = (tmp_path / "out" / "sweeps").iterdir()
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["overrides"]["8:4.weight"], r["status"]) for r in records) == [(0, "ok"), (1, "ok")], records
