"""The pack's V3 node API side (comfy_v3.py, the choice in __init__.py). Outside ComfyUI the pack stays
V1 whatever LORALOOM_COMFY_NODES says. What needs ComfyUI's ``comfy_api`` runs in ComfyUI's own Python
(it imports ComfyUI's modules, av among them), as a subprocess in the ComfyUI folder that
LORALOOM_COMFYUI names, loading the pack as ComfyUI loads a custom node; skipped without it. The
ComfyUI servers themselves are in tests/comfyui/test_v3.py."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = os.environ.get("LORALOOM_COMFYUI")


@pytest.mark.parametrize("forced", ["", "v3", "v1", "v2"])
def test_outside_comfyui_the_pack_stays_v1_whatever_the_variable_says(forced):
    code = ("import loraloom, sys, json; print(json.dumps([type(loraloom.NODE_CLASS_MAPPINGS).__name__, "
            "len(loraloom.NODE_CLASS_MAPPINGS), hasattr(loraloom, 'comfy_entrypoint'), 'torch' in sys.modules]))")
    env = {**os.environ, "LORALOOM_COMFY_NODES": forced}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    kind, count, entrypoint, torch = json.loads(proc.stdout.splitlines()[-1])
    assert (kind, entrypoint, torch) == ("dict", False, False) and count >= 12, proc.stdout


def test_what_v1_and_v3_both_take_is_derived_once():
    """SweepGrid inside ComfyUI: its lazy link raw and its hidden inputs come from comfy_input_types,
    which comfy_v3 reads too; a node without either has its schema's INPUT_TYPES unchanged."""
    import loraloom
    from loraloom.comfy_integration import comfy_hidden, comfy_input_types

    sweep = loraloom.NODE_CLASS_MAPPINGS["SweepGrid"]
    types = sweep.INPUT_TYPES()
    assert types == comfy_input_types(sweep)
    assert types["required"]["images"][1]["rawLink"] is True and types["required"]["images"][1]["lazy"] is True
    assert types["hidden"] == comfy_hidden(sweep) == {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}
    sample = loraloom.NODE_CLASS_MAPPINGS["Sample"]
    assert comfy_input_types(sample) == sample.SCHEMA.input_types() == sample.INPUT_TYPES()


def comfy_probe(tmp_path: Path, env: dict | None = None) -> dict:
    """tests/comfy_v3_probe.py's facts: the pack loaded by ComfyUI's Python as ComfyUI loads it."""
    folder = Path(COMFYUI).resolve()
    venv = os.environ.get("LORALOOM_COMFYUI_PYTHON") or folder.parent / "venv" / "bin" / "python"
    python = str(venv) if Path(venv).exists() else sys.executable
    proc = subprocess.run([python, str(ROOT / "tests" / "comfy_v3_probe.py"), str(ROOT), str(tmp_path)],
                          capture_output=True, text=True, cwd=folder, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(folder), **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FACTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("FACTS "):])


NO_COMFYUI = "set LORALOOM_COMFYUI to a ComfyUI folder (with main.py) to load the pack as ComfyUI does"


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    if not COMFYUI:
        pytest.skip(NO_COMFYUI)
    return comfy_probe(tmp_path_factory.mktemp("v3"), {"LORALOOM_COMFY_NODES": ""})


NODES = {"LoadBase", "LoadLoRA", "WeightedBlend", "PeftMerge", "Fuse", "Compile", "Sample", "SaveLoRA", "SavePipeline",
         "SaveCheckpoint", "SweepGrid", "SweepGridCells"}


def test_in_comfyui_the_pack_registers_its_nodes_through_v3_and_none_through_v1(v3):
    assert v3["loaded"] and not v3["log"], v3["log"]
    assert set(v3["v3"]) >= NODES and not v3["v1"], (v3["v3"], v3["v1"])
    assert v3["module_mappings"] == "NoneType", "NODE_CLASS_MAPPINGS is None: ComfyUI would take it before V3"


def test_v3_queue_checks_are_v1s_and_name_every_widget(v3):
    assert not v3["argspec_mismatch"], "ComfyUI passes validate_inputs the widgets its signature names"
    for node_id, (through_v3, through_v1) in v3["refused"].items():
        assert isinstance(through_v3, str) and through_v3 == through_v1, node_id
    assert "input 'width': 130 is not a multiple of 8" in v3["refused"]["Sample"][0]
    assert "Fix: give a name relative to ComfyUI/output" in v3["refused"]["SaveLoRA"][0]
    assert v3["accepted"] is True, "the defaults pass"


def test_v3_fingerprint_is_v1s_and_follows_a_files_content(v3):
    (one_v3, one_v1), (two_v3, two_v1) = v3["fingerprint"]
    assert one_v3 == one_v1 and two_v3 == two_v1 and one_v3 != two_v3 and one_v3, v3["fingerprint"]


def test_v3_execute_returns_the_nodes_outputs_and_its_text_as_ui(v3):
    assert v3["execute"]["base"] == ["NodeOutput", 1, None]
    kind, outputs, ui = v3["execute"]["fuse"]
    assert (kind, outputs) == ("NodeOutput", 1) and ui["text"] and all(isinstance(t, str) for t in ui["text"]), ui


def test_v3_sweep_grid_expands_into_its_cells_with_its_hidden_inputs(v3):
    sweep = v3["sweep"]
    assert sweep["enable_expand"] is True
    assert sweep["result"] == [["5.grid", 0]], "the grid node's output is the SweepGrid's"
    assert sweep["expand"] == {"5.0.1": "LoadBase", "5.0.2": "Sample", "5.1.1": "LoadBase", "5.1.2": "Sample",
                               "5.grid": sweep["cells_node"]}, "one copy of the image's upstream per cell, and the grid"
    assert sweep["seeds"] == [1, 2]


def test_v3_combo_lists_are_read_when_comfyui_asks(v3):
    assert v3["listed"] == [False, True], "a LoRA added after start is offered at the next /object_info"


def test_v3_makes_a_deprecated_node_per_old_id_and_uses_comfyuis_own_socket_types(v3):
    new, old = v3["aliases"]  # the old id, listed among the V1 classes too, is made once, as deprecated
    assert (new["id"], new["deprecated"], old["id"], old["deprecated"]) == ("LoraLoomProbe", False, "ProbeOld", True)
    assert (new["display_name"], old["display_name"]) == ("Loom Probe", "Loom Probe [old id ProbeOld]")
    assert (new["runs"], old["runs"]) == ("Probe", "ProbeOldDeprecated"), "each runs its V1 class"
    for made in (new, old):
        assert made["core_types"] == [True, True], "MODEL and CLIP are ComfyUI's io.Model and io.Clip"
        assert made["outputs"] == ["MODEL", "CLIP", "LORA_WEIGHTS"] and made["ran"] == ["m", "c", 0.5], made


@pytest.mark.parametrize("forced, expected", [("v1", "v1"), ("v2", None)])
def test_in_comfyui_the_variable_forces_v1_and_a_bad_value_is_refused(tmp_path, forced, expected):
    if not COMFYUI:
        pytest.skip(NO_COMFYUI)
    facts = comfy_probe(tmp_path, {"LORALOOM_COMFY_NODES": forced})
    if expected == "v1":
        assert facts["loaded"] and set(facts["v1"]) >= NODES and not facts["v3"], facts
        assert facts["module_mappings"] == "dict"
    else:
        assert not facts["loaded"] and not facts["v3"] and not facts["v1"], facts
        said = " ".join(facts["log"])
        assert "LORALOOM_COMFY_NODES='v2' is not one of ['v1', 'v3']" in said and "Fix: set" in said, said
