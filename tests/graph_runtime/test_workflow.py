"""workflow.py: loading workflows, UI-format conversion as the editor writes it, overrides, PNG round trip."""

import json
import os
import struct
import zlib
from pathlib import Path

import pytest

from loraloom.graph_runtime import (Boolean, Float, Int, NodeRegistry, Output, Runtime, SchemaError, String,
                                    WorkflowError, load_workflow, node)
from loraloom.graph_runtime.schema import CONTROL_START_KEY

SHIPPED = Path(__file__).resolve().parents[2] / "workflows"


def editor_node(id, type, *, inputs=(), outputs=(), widgets=None, mode=0, order=0, title=None):
    """A node the way ComfyUI's editor (frontend 1.x, workflow version 0.4) saves it."""
    n = {"id": id, "type": type, "pos": [100.0 * id, 200.0], "size": [315, 106], "flags": {}, "order": order,
         "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
         "properties": {"Node name for S&R": type}}
    if widgets is not None:
        n["widgets_values"] = widgets
    if title:
        n["title"] = title
    return n


def editor_ui():
    """Seeded (seed widget + control value) -> Scale (factor fed by a PrimitiveNode through a Reroute)
    -> bypassed MaybeFail -> Show; a muted Show hangs off node 2."""
    nodes = [
        editor_node(1, "Seeded", widgets=["mul", 7, "randomize", 3],
                    outputs=[{"name": "NUMBER", "type": "NUMBER", "links": [1], "slot_index": 0}]),
        editor_node(2, "Scale", widgets=[2.0],
                    inputs=[{"name": "x", "type": "NUMBER", "link": 1},
                            {"name": "factor", "type": "FLOAT", "link": 5, "widget": {"name": "factor"}}],
                    outputs=[{"name": "y", "type": "NUMBER", "links": [2, 6], "slot_index": 0},
                             {"name": "label", "type": "TEXT", "links": None}]),
        editor_node(3, "MaybeFail", widgets=[True], mode=4,
                    inputs=[{"name": "x", "type": "NUMBER", "link": 2}],
                    outputs=[{"name": "NUMBER", "type": "NUMBER", "links": [3], "slot_index": 0}]),
        editor_node(4, "Show", inputs=[{"name": "x", "type": "NUMBER", "link": 3}], title="Result"),
        editor_node(5, "PrimitiveNode", widgets=[-1.5, "fixed"],
                    outputs=[{"name": "FLOAT", "type": "FLOAT", "links": [4],
                              "widget": {"name": "factor"}}]),
        editor_node(6, "Reroute", inputs=[{"name": "", "type": "*", "link": 4}],
                    outputs=[{"name": "", "type": "FLOAT", "links": [5]}]),
        editor_node(7, "Show", mode=2, inputs=[{"name": "x", "type": "NUMBER", "link": 6}]),
        editor_node(8, "Note", widgets=["a note"]),
    ]
    links = [[1, 1, 0, 2, 0, "NUMBER"], [2, 2, 0, 3, 0, "NUMBER"], [3, 3, 0, 4, 0, "NUMBER"],
             [4, 5, 0, 6, 0, "FLOAT"], [5, 6, 0, 2, 1, "FLOAT"], [6, 2, 0, 7, 0, "NUMBER"]]
    return {"last_node_id": 8, "last_link_id": 6, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}


def test_ui_conversion_handles_what_the_editor_writes(stubs):
    api = load_workflow(editor_ui(), stubs.registry).prompt
    assert set(api) == {"1", "2", "4"}, "muted, bypassed and frontend-only nodes are dropped"
    assert api["1"]["inputs"] == {"mode": "mul", "seed": 7, "steps": 3}, \
        "the control_after_generate value after 'seed' must be skipped"
    assert api["2"]["inputs"] == {"x": ["1", 0], "factor": -1.5}, "PrimitiveNode value through a Reroute"
    assert api["4"]["inputs"] == {"x": ["2", 0]}, "the bypassed node passes its NUMBER input through"
    assert api["4"]["_meta"] == {"title": "Result"}


def test_ui_workflow_runs(stubs, tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(editor_ui()))
    result = Runtime(registry=stubs.registry, output_dir=tmp_path).run(path)
    assert result.outputs == {"4": {"value": [21 * -1.5]}}


def test_link_from_muted_node_leaves_input_missing(stubs):
    ui = editor_ui()
    ui["nodes"][0]["mode"] = 2  # mute Seeded: Scale.x loses its source
    with pytest.raises(Exception) as info:
        Runtime(registry=stubs.registry).validate(ui)
    assert "node 2 (Scale) input 'x': required input is missing" in str(info.value)


def test_dict_widgets_values_and_dangling_link(stubs):
    ui = editor_ui()
    ui["nodes"][0]["widgets_values"] = {"mode": "add", "seed": 1, "steps": 2}
    assert load_workflow(ui, stubs.registry).prompt["1"]["inputs"] == {"mode": "add", "seed": 1, "steps": 2}
    ui["nodes"][1]["inputs"][0]["link"] = 99
    with pytest.raises(WorkflowError, match="link 99 is used by a node but missing"):
        load_workflow(ui, stubs.registry)


@pytest.mark.parametrize("bad,fragment", [
    ([1, 2], "not list"),
    ({"1": 5}, "expected an object with 'class_type'"),
    ({"1": {"inputs": {}}}, "'class_type' must be a node id string"),
    ({"1": {"class_type": "Const", "inputs": []}}, "'inputs' must be an object"),
])
def test_api_shape_errors(stubs, bad, fragment):
    with pytest.raises(WorkflowError, match=fragment):
        load_workflow(bad, stubs.registry) if isinstance(bad, dict) else load_workflow(bad, stubs.registry)


def test_overrides_forms_and_unknown_node(stubs):
    rt = Runtime(registry=stubs.registry)
    wf = {"1": {"class_type": "Const", "inputs": {"value": 1}}, "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}}}
    assert rt.load(wf, {"1.value": 5}).prompt["1"]["inputs"]["value"] == 5
    assert rt.load(wf, {"1": {"value": 6}}).prompt["1"]["inputs"]["value"] == 6
    with pytest.raises(WorkflowError, match=r"override 9\.value: workflow has no node 9 \(nodes: 1, 2\)"):
        rt.load(wf, {"9.value": 1})


def _png_with_text(chunks: dict) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    for key, value in chunks.items():
        out += chunk(b"tEXt", key.encode() + b"\0" + value.encode())
    return out + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


def test_png_with_embedded_workflow_runs(stubs, tmp_path):
    api = {"1": {"class_type": "Const", "inputs": {"value": 9}}, "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}}}
    png = tmp_path / "out.png"
    png.write_bytes(_png_with_text({"prompt": json.dumps(api), "workflow": json.dumps(editor_ui())}))
    wf = load_workflow(png, stubs.registry)
    assert wf.prompt == api, "the embedded API prompt is exactly what ran"
    assert wf.ui["version"] == 0.4
    bare = tmp_path / "bare.png"
    bare.write_bytes(_png_with_text({}))
    with pytest.raises(WorkflowError, match="carries no workflow"):
        load_workflow(bare, stubs.registry)


def test_api_to_ui_round_trip(stubs):
    from loraloom.graph_runtime.workflow import api_to_ui, ui_to_api

    api = {"1": {"class_type": "Seeded", "inputs": {"mode": "mul", "seed": 7, "steps": 3}},
           "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": -1.5}},
           "3": {"class_type": "Const", "inputs": {"value": 4}},
           "4": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["3", 0]}},
           "5": {"class_type": "Show", "inputs": {"x": ["4", 0]}, "_meta": {"title": "Out"}}}
    ui = api_to_ui(api, stubs.registry)
    assert ui["version"] == 1 and len(ui["links"]) == 4, "the 1.0 schema, which the shipped editor loads"
    assert ui["links"][0] == {"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0,
                              "type": "NUMBER"}, "links are objects"
    assert ui["state"] == {"lastNodeId": 5, "lastLinkId": 4, "lastGroupId": 0, "lastRerouteId": 0}
    assert api_to_ui(api, stubs.registry)["id"] == ui["id"], "the same prompt converts to the same file"
    seeded = [n for n in ui["nodes"] if n["type"] == "Seeded"][0]
    assert seeded["widgets_values"] == ["mul", 7, "fixed", 3], "seed widgets carry the editor's control value"
    xs = {n["id"]: n["pos"][0] for n in ui["nodes"]}
    assert xs[1] < xs[2] < xs[4] < xs[5], "columns follow the data flow"
    titled = {nid: {**entry, "_meta": entry.get("_meta", {"title": entry["class_type"]})} for nid, entry in api.items()}
    assert ui_to_api(ui, stubs.registry) == titled, "the prompt back, every node titled as the editor exports it"
    assert ui_to_api(api_to_ui(titled, stubs.registry), stubs.registry) == titled, "titles survive API -> UI -> API"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_png_with_two_prompt_chunks_is_refused(stubs, tmp_path):
    api = {"1": {"class_type": "Const", "inputs": {"value": 9}}, "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}}}
    other = {**api, "1": {"class_type": "Const", "inputs": {"value": 1}}}
    png = _png_with_text({"prompt": json.dumps(api)})
    second = _chunk(b"tEXt", b"prompt\0" + json.dumps(other).encode())
    path = tmp_path / "two.png"
    path.write_bytes(png[:-12] + second + png[-12:])  # before IEND
    with pytest.raises(WorkflowError) as info:
        load_workflow(path, stubs.registry)
    assert info.value.kind == "duplicate_chunk" and "two 'prompt' chunks" in str(info.value), str(info.value)
    assert str(path) in str(info.value)


def test_png_itxt_inflation_is_bounded(stubs, tmp_path, monkeypatch):
    from loraloom.graph_runtime import workflow

    monkeypatch.setattr(workflow, "MAX_WORKFLOW_BYTES", 1000)
    bomb = zlib.compress(b" " * 10**6)  # 1 MB of spaces in about 1 kB
    itxt = _chunk(b"iTXt", b"workflow\0\x01\x00\0\0" + bomb)
    png = _png_with_text({})
    path = tmp_path / "bomb.png"
    path.write_bytes(png[:-12] + itxt + png[-12:])
    with pytest.raises(WorkflowError, match="inflates to more than 1000 bytes"):
        load_workflow(path, stubs.registry)


@pytest.mark.parametrize("suffix", [".json", ".png"])
@pytest.mark.parametrize("make", ["fifo", "dev_zero_link", "huge_sparse"])
def test_odd_workflow_files_are_refused_quickly(stubs, ends_quickly, tmp_path, suffix, make):
    path = tmp_path / f"odd{suffix}"
    if make == "fifo":
        os.mkfifo(path)
    elif make == "dev_zero_link":
        os.symlink("/dev/zero", path)
    else:
        with open(path, "wb") as f:
            if suffix == ".png":
                f.write(b"\x89PNG\r\n\x1a\n")
            f.truncate(10 * 2**30)
    exc = ends_quickly(lambda: load_workflow(path, stubs.registry))
    assert isinstance(exc, WorkflowError), repr(exc)
    assert str(path) in str(exc), str(exc)


def editor_widget_count(info: dict) -> int:
    """How many values ComfyUI's frontend keeps for a node of this ``/object_info`` entry: one per
    widget input, two where it adds a control_after_generate widget (the spec says true, or it does
    not say and the input is an INT named seed or noise_seed; frontend 1.27 to 1.58)."""
    count = 0
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            kind, opts = (info["input"][section][name] + (None, {}))[:2]
            if not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
                continue
            control = opts.get("control_after_generate")
            if control is None:
                control = kind == "INT" and name in ("seed", "noise_seed")
            count += 2 if control else 1
    return count


@node(category="test", inputs=[Int("seed", 0, min=0, max=100, control_after_generate=False),
                               Float("weight", 1.0, min=-5, max=5), Float("gamma", 0.5, min=0, max=1, optional=True)],
      outputs=[Output("NUMBER")])
class MergeSeeded:
    """A seed without a control widget, a weight after it, an option added later."""

    def execute(self, seed, weight, gamma=0.5):
        return (seed * weight,)


@node(category="test", inputs=[Int("seed", 0, min=0, max=100), String("note", ""), Boolean("flag", False)],
      outputs=[Output("NUMBER")])
class SeedThenText:
    def execute(self, seed, note, flag):
        return (seed,)


def _one_node(type: str, widgets) -> dict:
    return {"nodes": [editor_node(1, type, widgets=widgets)], "links": [], "version": 0.4}


def test_a_control_starts_at_the_declared_mode():
    @node(category="test", inputs=[Int("seed", 0, control_after_generate="fixed"), Int("rank", 0)],
          outputs=[Output("NUMBER")])
    class FixedSeed:
        def execute(self, seed, rank):
            return (seed,)

    types = FixedSeed.INPUT_TYPES()["required"]
    assert types["seed"][1]["control_after_generate"] is True, "ComfyUI 0.3.64's frontend takes only a boolean"
    assert types["seed"][1][CONTROL_START_KEY] == "fixed", "the pack's editor extension starts the control there"
    assert "control_after_generate" not in types["rank"][1]
    with pytest.raises(SchemaError, match="control_after_generate 'sometimes' is neither a bool nor one of"):
        node(category="test", inputs=[Int("seed", control_after_generate="sometimes")],
             outputs=[Output("NUMBER")])(FixedSeed)


def test_a_seed_declared_without_control_tells_the_editor_so():
    info = MergeSeeded.SCHEMA.object_info()
    assert info["input"]["required"]["seed"][1]["control_after_generate"] is False, \
        "unsaid, the editor gives every INT named seed a control widget that starts at 'randomize'"
    assert editor_widget_count(info) == 3
    assert SeedThenText.SCHEMA.object_info()["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert editor_widget_count(SeedThenText.SCHEMA.object_info()) == 4


@pytest.mark.parametrize("widgets,expected", [
    ([7, 0.3, 0.9], {"seed": 7, "weight": 0.3, "gamma": 0.9}),  # as the editor writes it now
    ([7, "fixed", 0.3, 0.9], {"seed": 7, "weight": 0.3, "gamma": 0.9}),  # an editor that added a control
    ([7, "randomize", 0.3], {"seed": 7, "weight": 0.3}),  # ... to a file from before gamma: count says no control
    ([7, 0.3], {"seed": 7, "weight": 0.3}),  # from before gamma, without a control
])
def test_widget_values_are_read_with_and_without_control_values(widgets, expected):
    registry = NodeRegistry([MergeSeeded, SeedThenText])
    assert load_workflow(_one_node("MergeSeeded", widgets), registry).prompt["1"]["inputs"] == expected


def test_a_declared_control_value_is_optional_in_the_file():
    registry = NodeRegistry([MergeSeeded, SeedThenText])
    read = {"seed": 7, "note": "a", "flag": True}
    assert load_workflow(_one_node("SeedThenText", [7, "fixed", "a", True]), registry).prompt["1"]["inputs"] == read
    assert load_workflow(_one_node("SeedThenText", [7, "a", True]), registry).prompt["1"]["inputs"] == read
    assert load_workflow(_one_node("SeedThenText", [7, "increment", "a"]), registry).prompt["1"]["inputs"] == \
        {"seed": 7, "note": "a"}, "the count is short, but only one reading fits (flag cannot be 'a')"
    with pytest.raises(WorkflowError) as info:
        load_workflow(_one_node("SeedThenText", [7, "fixed"]), registry)
    err = info.value
    assert err.kind == "ambiguous_widgets" and err.node == "1" and err.class_type == "SeedThenText", str(err)
    assert "with and without a control value" in str(err) and "after seed" in str(err) and err.fix, str(err)


def test_shipped_ui_workflows_have_a_value_for_every_widget_the_editor_shows():
    """Otherwise the editor puts every later value into the widget before it."""
    from loraloom.nodes import registry

    reg = registry()
    for path in sorted(SHIPPED.glob("*.json")):
        ui = json.loads(path.read_text())
        if "nodes" not in ui:
            continue
        for n in ui["nodes"]:
            cls = reg.get(n["type"])
            if cls is not None:
                assert len(n.get("widgets_values", [])) == editor_widget_count(cls.SCHEMA.object_info()), \
                    f"{path.name}: node {n['id']} ({n['type']}) {n.get('widgets_values')}"


@pytest.mark.parametrize("saved", [
    [1.0, 1.0, "dare_linear", 0.5, "total", 0, 0.0, 7, "randomize", 0.3, 0.6, 0.01],  # as the editor saves it
    [1.0, 1.0, "dare_linear", 0.5, "total", 0, 0.0, 7, "fixed", 0.3, 0.6],  # ... before gamma existed
    [1.0, 1.0, "dare_linear", 0.5, "total", 0, 0.0, 7, 0.3, 0.6, 0.01],  # as `convert --to ui` wrote it before
])
def test_a_merge_saved_by_any_editor_reads_as_it_showed(saved):
    """The issue's case: a PeftMerge saved with a control value after its seed read 'fixed' as weight_c."""
    from loraloom.nodes import registry

    inputs = load_workflow(_one_node("PeftMerge", saved), registry()).prompt["1"]["inputs"]
    assert (inputs["seed"], inputs["weight_c"], inputs["weight_d"]) == (7, 0.3, 0.6), inputs


def _api_prompt():
    return {"1": {"class_type": "Const", "inputs": {"value": 3}},
            "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": "BAD"}},
            "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}}}


def _ui_with(where: str) -> dict:
    ui = editor_ui()
    if where == "widget":
        ui["nodes"][0]["widgets_values"][3] = "BAD"  # Seeded's steps, after the seed's control value
    elif where == "pos":
        ui["nodes"][1]["pos"][0] = "BAD"
    else:
        ui["extra"]["ds"]["scale"] = "BAD"
    return ui


@pytest.mark.parametrize("literal, kind", [("NaN", "not_finite"), ("Infinity", "not_finite"),
                                           ("-Infinity", "not_finite"), ("1e999", "overflow")])
@pytest.mark.parametrize("form, where", [
    ("api.json", "node 2 (Scale) input 'factor'"),
    ("body.json", "node 2 (Scale) input 'factor'"),  # what POST /prompt takes
    ("ui-widget.json", "node 1 (Seeded) input 'steps'"),
    ("ui-pos.json", "node 2 (Scale): at '$.nodes[1].pos[0]'"),
    ("ui-extra.json", "at '$.extra.ds.scale'"),
    ("prompt.png", "node 2 (Scale) input 'factor'"),
    ("workflow.png", "node 1 (Seeded) input 'steps'"),
])
def test_a_non_finite_number_is_named_by_node_and_input(stubs, tmp_path, literal, kind, form, where):
    data = {"api.json": _api_prompt(), "body.json": {"prompt": _api_prompt()}, "ui-widget.json": _ui_with("widget"),
            "ui-pos.json": _ui_with("pos"), "ui-extra.json": _ui_with("extra"), "prompt.png": _api_prompt(),
            "workflow.png": _ui_with("widget")}[form]
    text = json.dumps(data).replace('"BAD"', literal)
    path = tmp_path / form
    if form.endswith(".png"):
        path.write_bytes(_png_with_text({form.removesuffix(".png"): text}))
    else:
        path.write_text(text)
    with pytest.raises(WorkflowError) as info:
        load_workflow(path, stubs.registry)
    chunk = f" ({form.removesuffix('.png')})" if form.endswith(".png") else ""
    assert str(info.value).startswith(f"{path}{chunk}: {where}: "), str(info.value)
    assert literal in str(info.value) and info.value.kind == kind and info.value.value == literal


@pytest.mark.parametrize("node_type", [[], {}, 7, None])
def test_a_non_finite_number_beside_a_node_type_that_is_not_a_string_is_our_error(stubs, tmp_path, node_type):
    # Locating the bad number asks the registry for the node's type, which a stranger's file may make any value.
    path = tmp_path / "ui.json"
    path.write_text(json.dumps({"nodes": [{"id": 0, "type": node_type, "mode": 0, "inputs": [],
                                           "widgets_values": ["BAD"]}], "links": []}).replace('"BAD"', "Infinity"))
    with pytest.raises(WorkflowError) as info:
        load_workflow(path, stubs.registry)
    assert "'$.nodes[0].widgets_values[0]': Infinity is not a finite number" in str(info.value), str(info.value)
    assert not stubs.registry.get(node_type) and node_type not in stubs.registry
