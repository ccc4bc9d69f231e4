"""What each command imports: the commands that build no model (``--help``, ``nodes``, ``convert``,
``validate`` of a graph without LoRA files) import no torch, a run of plugin nodes imports none of
diffusers, transformers or torch, and the libraries' progress-bar switch still works on a library
imported inside it; and ``loraloom run`` ends its process without the interpreter's teardown, its atexit
handlers and output intact. Each runs in a fresh interpreter: this test process has imported them all."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft")

# Runs the CLI in process, then prints which heavy libraries it imported (on the last line).
PROBE = textwrap.dedent('''
    import json, sys
    from loraloom.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
    print(json.dumps([name for name in {heavy!r} if name in sys.modules]))
''').format(heavy=HEAVY)

PLUGIN = textwrap.dedent('''
    from loraloom import register_node
    from loraloom.graph_runtime import Float, Output, node

    @node(category="import-test", inputs=[Float("value", 1.0)], outputs=[], output_node=True)
    class ImportProbeShow:
        def execute(self, value):
            return {"ui": {"value": [value]}}

    register_node(ImportProbeShow)
''')


def heavy_imports(args, cwd=ROOT, extra_path=None) -> list[str]:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = str(extra_path) + os.pathsep + env.get("PYTHONPATH", "")
    # stderr is a pipe, not a terminal: `run` switches the libraries' bars off, as in a log or CI
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["nodes"], ["convert", "workflows/blend.json"],
                                  ["convert", "workflows/shapes_blend.json", "--to", "ui"]],
                         ids=["help", "nodes", "convert", "convert-ui"])
def test_commands_that_build_nothing_import_no_torch(args):
    assert heavy_imports(args) == []


def test_validate_of_a_base_and_its_save_imports_no_torch(tmp_path):
    # listing the presets (LoadBase's options) must not import the pipeline code (it did: bases/__init__)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sdxl"}},
                              "2": {"class_type": "SavePipeline", "inputs": {"model": ["1", 0],
                                                                             "filename_prefix": "p"}}}))
    assert heavy_imports(["validate", str(wf)]) == []


def test_validate_of_a_sample_on_a_flux_base_imports_no_torch(tmp_path):
    # validation works out the base's architecture for Sample's checks (and refuses this width) without torch
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-flux"}},
                              "2": {"class_type": "Fuse", "inputs": {"model": ["1", 0]}},
                              "3": {"class_type": "Sample", "inputs": {"model": ["2", 0], "width": 72}},
                              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}))
    assert heavy_imports(["validate", str(wf)]) == []


def test_validate_of_a_graph_with_a_lora_file_imports_no_torch(tmp_path):
    # LoadLoRA checks the file's header at validation; the header checks need no torch (they did:
    # lora/safefile's dtype table was made of torch dtypes). A bad header is still refused.
    import safetensors.torch
    import torch

    loras = tmp_path / "loras"
    loras.mkdir()
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4, dtype=torch.bfloat16)},
                                loras / "a.safetensors")
    (loras / "bad.safetensors").write_bytes((8).to_bytes(8, "little") + b'{"a": 1}')
    for name, says in (("a.safetensors", "valid"), ("bad.safetensors", "header entry")):
        wf = tmp_path / f"{name}.json"
        wf.write_text(json.dumps({"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": name}},
                                  "2": {"class_type": "SaveLoRA", "inputs": {"lora": ["1", 0]}}}))
        proc = subprocess.run([sys.executable, "-c", PROBE, "validate", str(wf), "--lora-dir", str(loras)],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert says in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        assert json.loads(proc.stdout.splitlines()[-1]) == [], name


def test_a_run_of_plugin_nodes_imports_no_model_library(tmp_path):
    # A run whose stderr is no terminal switches diffusers' and transformers' bars off; it must not
    # import them to do so (it did, about 4 s) when no node uses them.
    (tmp_path / "import_probe_nodes.py").write_text(PLUGIN)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "ImportProbeShow", "inputs": {"value": 2.0}}}))
    args = ["run", str(wf), "--nodes-module", "import_probe_nodes", "--output-dir", str(tmp_path / "out")]
    assert heavy_imports(args, extra_path=tmp_path) == []


SWITCH_PROBE = textwrap.dedent('''
    import json, sys
    from loraloom.api import library_progress_bars_off

    def states():
        from diffusers.utils import logging as d
        from huggingface_hub import utils as h
        from transformers.utils import logging as t
        return [d.is_progress_bar_enabled(), t.is_progress_bar_enabled(), not h.are_progress_bars_disabled()]

    {before}
    with library_progress_bars_off():
        imported_inside = "diffusers" not in sys.modules
        inside = states()
    print(json.dumps([imported_inside, inside, states()]))
''')


@pytest.mark.parametrize("before", ["", "import huggingface_hub.utils", "import transformers", "states()"],
                         ids=["none-imported", "hub-imported", "transformers-imported", "all-imported"])
def test_library_bars_off_also_for_a_library_imported_inside_the_block(before):
    code = SWITCH_PROBE.format(before=before)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    imported_inside, inside, after = json.loads(proc.stdout.splitlines()[-1])
    assert imported_inside == (before != "states()")
    assert inside == [False, False, False], "diffusers', transformers' and huggingface_hub's bars are off"
    assert after == [True, True, True], "and on again after the block, as they were"


EXIT_PLUGIN = textwrap.dedent('''
    import atexit, os
    from loraloom import register_node
    from loraloom.graph_runtime import Float, Output, node

    OUT = os.environ["EXIT_PROBE_DIR"]
    atexit.register(lambda: open(os.path.join(OUT, "atexit_ran"), "w").close())

    class Teardown:
        """Freed by the interpreter's teardown (module globals are cleared then), not by os._exit."""
        def __del__(self, open=open, path=os.path.join(OUT, "teardown_ran")):  # globals may be gone by then
            open(path, "w").close()

    KEPT = Teardown()

    @node(category="import-test", inputs=[Float("value", 1.0, max=5.0)], outputs=[], output_node=True)
    class ExitProbeShow:
        def execute(self, value):
            return {"ui": {"value": [value]}}

    register_node(ExitProbeShow)
''')


@pytest.mark.parametrize("value, code", [(2.0, 0), (9.0, 1)], ids=["success", "validation-error"])
def test_run_ends_without_teardown_but_with_atexit_and_output(tmp_path, value, code):
    (tmp_path / "exit_probe_nodes.py").write_text(EXIT_PLUGIN)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "ExitProbeShow", "inputs": {"value": value}}}))
    env = dict(os.environ, EXIT_PROBE_DIR=str(tmp_path),
               PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "loraloom.cli", "run", str(wf), "--nodes-module", "exit_probe_nodes",
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == code, proc.stderr
    if code == 0:
        assert proc.stdout.startswith("done: 1 executed") and "node 1:" in proc.stdout, "stdout is flushed"
    else:
        assert "is above max 5.0" in proc.stderr, "stderr is flushed"
    assert (tmp_path / "atexit_ran").exists(), "atexit handlers (logging's, coverage's, the user's) still run"
    assert not (tmp_path / "teardown_ran").exists(), "the interpreter's teardown is skipped"


WAIT_PLUGIN = textwrap.dedent('''
    import os, sys
    from loraloom import register_node
    from loraloom.graph_runtime import Float, node

    @node(category="import-test", inputs=[Float("value", 1.0)], outputs=[], output_node=True)
    class WaitPolicyProbe:
        def execute(self, value):
            with open(os.environ["WAIT_PROBE_FILE"], "w") as f:
                f.write(os.environ.get("OMP_WAIT_POLICY", "unset"))
            return {"ui": {"value": [value]}}

    register_node(WaitPolicyProbe)
''')


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")], ids=["default", "user-set"])
def test_the_console_script_makes_openmp_wait_passively_unless_told(tmp_path, given, expected):
    (tmp_path / "wait_probe_nodes.py").write_text(WAIT_PLUGIN)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "WaitPolicyProbe", "inputs": {"value": 1.0}}}))
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(WAIT_PROBE_FILE=str(tmp_path / "policy"), PYTHONPATH=str(tmp_path) + os.pathsep + env.get("PYTHONPATH", ""))
    if given:
        env["OMP_WAIT_POLICY"] = given
    proc = subprocess.run([sys.executable, "-m", "loraloom.cli", "run", str(wf), "--nodes-module", "wait_probe_nodes",
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "policy").read_text() == expected, "torch's OpenMP threads read it when torch is imported"
