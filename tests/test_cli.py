"""The command line, in process and as the installed console script; `loraloom serve` as a user runs it;
docs/nodes.md as `loraloom nodes --markdown` writes it."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from loraloom.cli import main

ROOT = Path(__file__).resolve().parents[1]
needs_server = pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None,
                                  reason="the server needs the editor extra: pip install 'loraloom[editor]'")

PLUGIN = textwrap.dedent('''
    import time
    from loraloom import register_node
    from loraloom.graph_runtime import Float, Int, Link, Output, current_context, node

    @node(category="cli-test", inputs=[Float("value", 1.0, min=-10.0, max=10.0)], outputs=[Output("CLI_NUM")])
    class CliConst:
        """A constant."""
        def execute(self, value):
            return (value,)

    @node(category="cli-test", inputs=[Link("x", "CLI_NUM"), Int("steps", 3, min=1, max=100000)],
          outputs=[Output("CLI_NUM")])
    class CliSteps:
        def execute(self, x, steps):
            for i in range(steps):
                time.sleep(0.002)
                current_context().progress(i + 1, steps)
            return (x,)

    @node(category="cli-test", inputs=[Link("x", "CLI_NUM")], outputs=[], output_node=True)
    class CliShow:
        def execute(self, x):
            return {"ui": {"value": [x]}}

    for cls in (CliConst, CliSteps, CliShow):
        register_node(cls)
''')

WF = {"1": {"class_type": "CliConst", "inputs": {"value": 2.0}},
      "2": {"class_type": "CliSteps", "inputs": {"x": ["1", 0], "steps": 3}},
      "3": {"class_type": "CliShow", "inputs": {"x": ["2", 0]}}}


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "cli_plugin_nodes.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(WF))
    return wf


def test_run_with_events_jsonl(plugin, tmp_path, capsys):
    code = main(["run", str(plugin), "--nodes-module", "cli_plugin_nodes", "--events", "jsonl",
                 "--no-progress", "--set", "1.value=3.5", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "execution_start" and kinds[-1] == "execution_success"
    assert [e["value"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    done = [e for e in events if e["event"] == "executed" and e["node"] == "3"][0]
    assert done["output"] == {"value": [3.5]} and done["class_type"] == "CliShow"


def test_validation_error_exit_1_names_node_and_input(plugin, capsys):
    code = main(["run", str(plugin), "--nodes-module", "cli_plugin_nodes", "--set", "1.value=99"])
    assert code == 1
    err = capsys.readouterr().err
    assert "node 1 (CliConst) input 'value': 99.0 is above max 10.0" in err, err


def test_validate_json_and_ok(plugin, capsys):
    assert main(["validate", str(plugin), "--nodes-module", "cli_plugin_nodes"]) == 0
    assert "valid (3 nodes" in capsys.readouterr().out
    assert main(["validate", str(plugin), "--nodes-module", "cli_plugin_nodes", "--json",
                 "--set", "2.steps=0"]) == 1
    body = json.loads(capsys.readouterr().out)
    assert body["node_errors"]["2"]["errors"][0]["type"] == "value_smaller_than_min"


def test_nodes_lists_and_object_info(plugin, capsys):
    assert main(["nodes", "--nodes-module", "cli_plugin_nodes"]) == 0
    assert "CliConst" in capsys.readouterr().out
    assert main(["nodes", "--json", "--nodes-module", "cli_plugin_nodes"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["CliSteps"]["input_order"]["required"] == ["x", "steps"]


def test_convert_writes_api(plugin, tmp_path, capsys):
    out = tmp_path / "api.json"
    assert main(["convert", str(plugin), "-o", str(out), "--nodes-module", "cli_plugin_nodes"]) == 0
    titled = {nid: {**entry, "_meta": {"title": entry["class_type"]}} for nid, entry in WF.items()}
    assert json.loads(out.read_text()) == titled, "every node gets a title, as ComfyUI's editor exports"


def test_bad_file_is_error_1(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": {"class_type": "X", "inputs": {"v": NaN}}}')
    assert main(["run", str(bad)]) == 1
    assert "NaN is not a finite number" in capsys.readouterr().err


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return exc.code


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("extra, said", [
    (["--set", "bad"], "expected ID.INPUT=VALUE"),
    (["--set", "1value=3"], "expected ID.INPUT=VALUE"),
    (["--set", "1.=3"], "expected ID.INPUT=VALUE"),
    (["--set", ".value=3"], "expected ID.INPUT=VALUE"),
    (["--set", "1.value=1e999"], "number 1e999 is not finite"),
    (["--set", "9.value=3"], "has no node 9"),
    (["--max-pixels", "0"], "--max-pixels: 0 is below 1"),
    (["--nodes-module", "no_such_module_here"], "node module 'no_such_module_here' could not be imported"),
])
def test_a_malformed_flag_is_a_usage_error(plugin, capsys, command, extra, said):
    assert _exit_code([command, str(plugin), "--nodes-module", "cli_plugin_nodes", *extra]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, said", [
    (["run", "WF", "--cache-bytes", "-5"], "--cache-bytes: -5 is below 0"),
    (["run", "missing.json"], "No such file or directory"),
    (["validate", "missing.json"], "No such file or directory"),
    (["convert", "missing.json"], "No such file or directory"),
    (["serve", "--port", "70000"], "--port 70000 is not a port number"),
    (["serve", "--port", "-1"], "--port -1 is not a port number"),
])
def test_arguments_that_name_nothing_are_usage_errors(plugin, capsys, monkeypatch, argv, said):
    monkeypatch.chdir(plugin.parent)
    argv = [str(plugin) if a == "WF" else a for a in argv]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


def test_console_script_usage_error_and_ctrl_c(plugin, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "loraloom")
    usage = subprocess.run([exe, "run"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    proc = subprocess.Popen([exe, "run", str(plugin), "--nodes-module", "cli_plugin_nodes", "--no-progress",
                             "--events", "jsonl", "--set", "2.steps=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    for line in proc.stdout:
        if '"progress"' in line:
            break
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err


@needs_server
def test_the_cli_refuses_a_public_address_without_a_token(capsys, monkeypatch):
    monkeypatch.delenv("LORALOOM_SERVE_TOKEN", raising=False)
    assert main(["serve", "--listen", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0" in err and "--token" in err


def test_node_reference_doc_is_current():
    from loraloom.cli import nodes_markdown
    from loraloom.graph_runtime import NodeRegistry
    from loraloom.nodes import BUILTIN

    doc = (ROOT / "docs" / "nodes.md").read_text()
    assert doc == nodes_markdown(NodeRegistry(BUILTIN)), "docs/nodes.md is stale: run `loraloom nodes --markdown > docs/nodes.md`"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_server
def test_serve_starts_answers_and_stops_on_ctrl_c(tmp_path):
    port = _free_port()
    env = {**os.environ, "LORALOOM_USER_DIR": str(tmp_path / "user")}
    proc = subprocess.Popen([sys.executable, "-m", "loraloom.cli", "serve", "--port", str(port),
                             "--output-dir", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        assert f"http://127.0.0.1:{port}/" in proc.stdout.readline(), "the address is printed first"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/object_info", timeout=5) as resp:
                    info = json.load(resp)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.2)
        assert "WeightedBlend" in info and "SaveImage" in info, "the server runs our nodes"
        assert (tmp_path / "user" / "queue.sqlite3").is_file(), "the queue lives in the user folder"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out


def test_run_strict_files_makes_a_strict_runtime(plugin, tmp_path, monkeypatch):
    import loraloom.api

    made = []

    class Recorded(loraloom.api.Runtime):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            made.append(self)

    monkeypatch.setattr(loraloom.api, "Runtime", Recorded)
    args = ["run", str(plugin), "--nodes-module", "cli_plugin_nodes", "--no-progress", "--output-dir",
            str(tmp_path / "out")]
    assert main(args) == 0 and made[-1].strict_files is False
    assert main(args + ["--strict-files"]) == 0 and made[-1].strict_files is True


def _serve_args(tmp_path, port: int | None = None, user_dir=None) -> list[str]:
    return ["serve", "--port", str(port or _free_port()), "--user-dir", str(user_dir or tmp_path / "user"),
            "--output-dir", str(tmp_path / "out"), "--lora-dir", str(tmp_path)]


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 100)


def _foreign_table(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE prompts (name TEXT)")


@needs_server
@pytest.mark.parametrize("make_queue", [_garbage, _foreign_table])
def test_serve_on_a_queue_that_is_not_ours_says_so(tmp_path, capsys, make_queue):
    (tmp_path / "user").mkdir()
    make_queue(tmp_path / "user" / "queue.sqlite3")
    assert main(_serve_args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert str(tmp_path / "user" / "queue.sqlite3") in err and "queue database cannot be used" in err
    assert "Fix:" in err


@needs_server
@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes read-only files")
def test_serve_on_a_read_only_queue_says_so(tmp_path, capsys):
    from loraloom.server.store import PromptStore

    (tmp_path / "user").mkdir()
    PromptStore(tmp_path / "user" / "queue.sqlite3").close()
    (tmp_path / "user" / "queue.sqlite3").chmod(0o444)
    (tmp_path / "user").chmod(0o555)
    try:
        assert main(_serve_args(tmp_path)) == 1
    finally:
        (tmp_path / "user").chmod(0o755)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "queue database cannot be used" in err and "writable" in err, err


@needs_server
def test_serve_on_a_user_folder_that_is_a_file_says_so(tmp_path, capsys):
    (tmp_path / "user").write_text("")
    assert main(_serve_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'user'}: the user folder is a file, not a folder Fix: --user-dir DIR " \
                  "naming a folder (it is created if missing)\n", err


@needs_server
def test_a_second_serve_on_one_user_folder_names_the_live_one(tmp_path, capsys):
    from loraloom.server.app import UserDirLock

    (tmp_path / "user").mkdir()
    live = UserDirLock(tmp_path / "user", 8188)  # as a live server holds it
    try:
        assert main(_serve_args(tmp_path)) == 2
    finally:
        live.release()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(tmp_path / "user") in err and f"pid {os.getpid()}, port 8188" in err


@pytest.mark.parametrize("flag, value", [("--max-connections", "0"), ("--header-timeout", "nan"),
                                         ("--body-timeout", "-1"), ("--header-timeout", "inf")])
def test_serve_limits_must_be_positive(flag, value, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", flag, value])
    assert exited.value.code == 2 and flag in capsys.readouterr().err


def test_run_prints_the_full_path_of_each_output(plugin, tmp_path, capsys):
    (tmp_path / "cli_image_nodes.py").write_text(textwrap.dedent('''
        from loraloom import register_node
        from loraloom.graph_runtime import Output, node

        @node(category="cli-test", inputs=[], outputs=[Output("IMAGE")])
        class CliGrey:
            def execute(self):
                import torch
                return (torch.full((2, 8, 8, 3), 0.5),)

        register_node(CliGrey)
    '''))
    wf = tmp_path / "save.json"
    wf.write_text(json.dumps({"1": {"class_type": "CliGrey", "inputs": {}},
                              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "g/x"}},
                              "3": {"class_type": "CliConst", "inputs": {"value": 2.0}},
                              "4": {"class_type": "CliShow", "inputs": {"x": ["3", 0]}}}))
    out = tmp_path / "out"
    assert main(["run", str(wf), "--nodes-module", "cli_image_nodes", "--nodes-module", "cli_plugin_nodes",
                 "--output-dir", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    saved = [line.split(": ", 1)[1] for line in lines if line.startswith("  node 2: ")]
    assert saved == [str(out.resolve() / "g" / "x_00001_.png"), str(out.resolve() / "g" / "x_00002_.png")], lines
    assert all(Path(p).is_file() for p in saved), "each printed path is the saved file"
    assert '  node 4: {"value": [2.0]}' in lines, "an output that is no file is shown as it is"


def _run_cli(plugin, tmp_path, stderr, extra=()):
    """``loraloom run`` of the plugin workflow in a subprocess, stderr to ``stderr`` (a file or a pty)."""
    return subprocess.run([sys.executable, "-m", "loraloom.cli", "run", str(plugin), "--nodes-module", "cli_plugin_nodes",
                           "--output-dir", str(tmp_path / "out"), *extra], stdout=subprocess.PIPE, stderr=stderr,
                          env=os.environ.copy(), timeout=300)


def test_progress_into_a_log_is_a_plain_line_per_node(plugin, tmp_path):
    with open(tmp_path / "log", "w+b") as log:
        assert _run_cli(plugin, tmp_path, log).returncode == 0
        log.seek(0)
        text = log.read().decode()
    assert "\r" not in text and "\x1b[" not in text, f"no carriage returns or cursor moves in a log: {text!r}"
    lines = [line for line in text.splitlines() if line.startswith("[")]
    assert [line.split(" done in ")[0] for line in lines] == \
        ["[1/3] node 1 (CliConst)", "[2/3] node 2 (CliSteps)", "[3/3] node 3 (CliShow)"], text


def test_progress_on_a_terminal_is_bars(plugin, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    # a new pty is 0 x 0 characters, where tqdm draws nothing; a terminal has a size
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "loraloom.cli", "run", str(plugin), "--nodes-module",
                                 "cli_plugin_nodes", "--output-dir", str(tmp_path / "out")],
                                stdout=subprocess.PIPE, stderr=follower, env=os.environ.copy())
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed, the run is over
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=300) == 0
    finally:
        os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "nodes: 100%" in text and "3/3" in text, f"a terminal gets tqdm bars: {text!r}"
    assert "[1/3] node" not in text, "and not the log lines"


@pytest.mark.parametrize("flags", [["--no-progress"], []], ids=["no-progress", "stderr-not-a-terminal"])
def test_no_library_bars_without_ours(tmp_path, capsys, tiny_model_files, flags):
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    folder = tiny_model_files("tiny-sd15")["folder"]
    capsys.readouterr()  # what writing the fixture printed
    wf = tmp_path / "save.json"
    wf.write_text(json.dumps({"1": {"class_type": "LoadBase", "inputs": {"source": folder.name}},
                              "2": {"class_type": "SavePipeline", "inputs": {"model": ["1", 0],
                                                                             "filename_prefix": "p"}}}))
    assert main(["run", str(wf), "--models-dir", str(folder.parent), "--output-dir", str(tmp_path / "out"),
                 *flags]) == 0
    err = capsys.readouterr().err
    for bar in ("Loading pipeline components", "Loading weights", "Writing model shards", "it/s"):
        assert bar not in err, f"{bar!r} shown: {err}"
    assert "requires torchvision" not in err, err
    assert (tmp_path / "out" / "p_00001" / "model_index.json").is_file()
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled() \
        and not hub_utils.are_progress_bars_disabled(), "the libraries' switches are as they were after the run"


def test_a_node_module_that_fails_inside_is_an_error_not_a_usage_error(plugin, tmp_path, capsys):
    (tmp_path / "cli_broken_nodes.py").write_text("import no_such_dependency_here\n")
    assert main(["validate", str(plugin), "--nodes-module", "cli_broken_nodes"]) == 1
    err = capsys.readouterr().err
    assert "node module 'cli_broken_nodes' could not be imported" in err and "Fix: install what it needs" in err, err
