"""`_meta.title` on every node of an API-format workflow, as ComfyUI's editor exports it: API clients
find nodes by it (e.g. comfy-api-simplified's ``set_node_param(title, ...)``).

The editor's rule (comfyui-frontend-package, graphToPrompt): ``_meta: {title: node.title}``, where a
node's title is the one the user gave it, else its class's title ``display_name || name`` from
/object_info; a UI file stores ``title`` only when it differs from the class's."""

import json
from pathlib import Path

import pytest

from loraloom import Runtime
from loraloom.cli import main
from loraloom.graph_runtime.workflow import load_workflow, with_titles

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json") if not p.stem.endswith("_api"))


@pytest.fixture(scope="module")
def rt():
    return Runtime()


def editor_titles(ui: dict, object_info: dict) -> dict[str, str]:
    """The ``_meta.title`` ComfyUI's editor exports for each node of ``ui``."""
    return {str(n["id"]): n.get("title") or object_info[n["type"]]["display_name"] or n["type"] for n in ui["nodes"]}


@pytest.mark.parametrize("name", NAMES)
def test_convert_titles_every_node_as_the_editor_exports(name, rt, tmp_path, capsys):
    out = tmp_path / "api.json"
    assert main(["convert", str(WORKFLOWS / f"{name}.json"), "--to", "api", "-o", str(out)]) == 0
    api = json.loads(out.read_text())
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    expected = editor_titles(ui, rt.object_info())
    assert {nid: entry["_meta"]["title"] for nid, entry in api.items()} == expected
    assert any("title" not in n for n in ui["nodes"]), f"{name}: has untitled nodes (the case at stake)"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_api_files_are_what_convert_writes_for_their_ui_twins(name, rt):
    shipped = json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())
    converted = with_titles(load_workflow(WORKFLOWS / f"{name}.json", rt.registry).prompt, rt.registry)
    assert shipped == converted, (f"workflows/api/{name}_api.json is stale: regenerate it with "
                                  f"`loraloom convert workflows/{name}.json -o workflows/api/{name}_api.json`")
    assert all(isinstance(entry["_meta"]["title"], str) for entry in shipped.values())


def test_an_api_workflow_without_titles_gets_them_and_they_survive_the_round_trip(rt, tmp_path, capsys):
    bare = {nid: {"class_type": e["class_type"], "inputs": e["inputs"]}
            for nid, e in json.loads((WORKFLOWS / "api" / "blend_api.json").read_text()).items()}
    bare["5"]["_meta"] = {"title": "My sampler", "extra": 1}  # a renamed node; other _meta keys kept
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    assert main(["convert", str(tmp_path / "bare.json"), "--to", "api", "-o", str(tmp_path / "api.json")]) == 0
    api = json.loads((tmp_path / "api.json").read_text())
    names = {cid: info["display_name"] for cid, info in rt.object_info().items()}
    assert {nid: e["_meta"]["title"] for nid, e in api.items()} == {
        nid: "My sampler" if nid == "5" else names[e["class_type"]] for nid, e in bare.items()}
    assert api["5"]["_meta"] == {"title": "My sampler", "extra": 1}

    assert main(["convert", str(tmp_path / "api.json"), "--to", "ui", "-o", str(tmp_path / "ui.json")]) == 0
    assert main(["convert", str(tmp_path / "ui.json"), "--to", "api", "-o", str(tmp_path / "back.json")]) == 0
    back = json.loads((tmp_path / "back.json").read_text())
    assert {nid: e["_meta"]["title"] for nid, e in back.items()} == {
        nid: e["_meta"]["title"] for nid, e in api.items()}, "titles survive API -> UI -> API"
