"""The Python API: ``loraloom.Runtime`` runs LoRA Loom's nodes and the user's own (``register_node``,
``load_node_modules``), with overrides, listeners and interrupt."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import loraloom
from loraloom import api
from loraloom.graph_runtime import (Folders, Int, Interrupted, Link, LoomError, Output, String, current_context,
                                    node)
from loraloom.nodes import BUILTIN


@node(category="api-test", inputs=[Int("value", 1, min=-100, max=100)], outputs=[Output("API_NUM")])
class ApiConst:
    def execute(self, value):
        return (value,)


@node(category="api-test", inputs=[Link("x", "API_NUM"), Int("steps", 3, min=1, max=100000)],
      outputs=[Output("API_NUM")])
class ApiSteps:
    def execute(self, x, steps):
        ctx = current_context()
        for i in range(steps):
            ctx.progress(i + 1, steps)
        return (x * 2,)


@node(category="api-test", inputs=[Link("x", "API_NUM"), String("label", "")], outputs=[], output_node=True)
class ApiShow:
    def execute(self, x, label):
        return {"ui": {"value": [x], "label": [label]}}


USER_NODES = (ApiConst, ApiSteps, ApiShow)
WF = {"1": {"class_type": "ApiConst", "inputs": {"value": 5}},
      "2": {"class_type": "ApiSteps", "inputs": {"x": ["1", 0], "steps": 3}},
      "3": {"class_type": "ApiShow", "inputs": {"x": ["2", 0], "label": "a"}}}


@pytest.fixture
def node_registry(monkeypatch):
    """The process-wide node registry, restored afterwards: what a test registers stays in the test."""
    from loraloom import nodes

    monkeypatch.setattr(nodes, "_REGISTRY", nodes.registry().copy())
    return nodes.registry


@pytest.fixture
def user_runtime(node_registry, tmp_path):
    """A Runtime made after the user nodes were registered with ``register_node``."""
    for cls in USER_NODES:
        loraloom.register_node(cls)
    return api.Runtime(lora_dirs=[tmp_path / "loras"], models_dir=tmp_path / "models", output_dir=tmp_path / "out")


@pytest.fixture
def node_module(tmp_path, monkeypatch):
    """``node_module(name, source)``: a module file on sys.path, forgotten again after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_runtime_holds_the_builtin_nodes_and_registered_ones(user_runtime):
    ids = set(user_runtime.registry)
    assert {cls.SCHEMA.id for cls in BUILTIN} <= ids, "every built-in node"
    assert {"ApiConst", "ApiSteps", "ApiShow"} <= ids, "and the user's registered ones"
    result = user_runtime.run(WF)
    assert result.outputs["3"] == {"value": [10], "label": ["a"]}
    assert sorted(result.executed) == ["1", "2", "3"]
    info = user_runtime.object_info()
    assert info["ApiSteps"]["category"] == "api-test" and "LoadBase" in info


def test_register_node_reaches_new_runtimes_only(node_registry, tmp_path):
    before = api.Runtime(output_dir=tmp_path / "out")
    assert loraloom.register_node(ApiConst) is ApiConst, "usable as a decorator"
    after = api.Runtime(output_dir=tmp_path / "out")
    assert "ApiConst" in after.registry and "ApiConst" not in before.registry, \
        "a Runtime keeps the node set it was made with"
    after.register(ApiShow)
    assert "ApiShow" not in node_registry() and "ApiShow" not in api.Runtime().registry, \
        "Runtime.register adds to that runtime only"


def test_a_node_id_taken_by_a_builtin_is_refused(node_registry):
    @node(category="api-test", inputs=[], outputs=[Output("API_NUM")])
    class LoadLoRA:
        def execute(self):
            return (1,)

    with pytest.raises(LoomError, match="LoadLoRA"):
        loraloom.register_node(LoadLoRA)
    assert node_registry().get("LoadLoRA") is not LoadLoRA


def test_overrides_set_inputs_for_one_run(user_runtime):
    assert user_runtime.run(WF, overrides={"1.value": 7}).outputs["3"]["value"] == [14]
    assert user_runtime.run(WF, overrides={"3": {"label": "b"}}).outputs["3"] == {"value": [10], "label": ["b"]}
    assert WF["1"]["inputs"]["value"] == 5, "the caller's workflow dict is not changed"
    rerun = user_runtime.run(WF, overrides={"3.label": "c"})
    assert rerun.executed == ["3"], "an override changes that node only; the rest comes from the cache"


def test_listeners_see_every_run_until_removed(user_runtime):
    seen, own = [], []
    listener = seen.append
    user_runtime.add_listener(listener)
    first = user_runtime.run(WF, on_event=own.append, prompt_id="p-1")
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "execution_start" and kinds[-1] == "execution_success", kinds
    assert [e["value"] for e in seen if e["event"] == "progress"] == [1, 2, 3]
    assert {e["prompt_id"] for e in seen} == {first.prompt_id} == {"p-1"}
    assert own == seen, "on_event gets the same events as the runtime's listeners"
    user_runtime.run(WF, overrides={"1.value": 6})
    assert sum(e["event"] == "execution_start" for e in seen) == 2, "a listener hears every run"
    user_runtime.remove_listener(listener)
    count = len(seen)
    user_runtime.run(WF, overrides={"1.value": 8})
    assert len(seen) == count, "a removed listener hears nothing more"


def test_interrupt_stops_the_run_and_the_next_run_works(user_runtime):
    events = []

    def on_event(event):
        events.append(event)
        if event["event"] == "progress" and event["value"] == 2:
            threading.Thread(target=user_runtime.interrupt).start()

    with pytest.raises(Interrupted):
        user_runtime.run(WF, overrides={"2.steps": 100000}, on_event=on_event)
    assert events[-1]["event"] == "execution_interrupted" and events[-1]["node"] == "2", events[-1]
    assert events[-1]["executed"] == ["1"]
    result = user_runtime.run(WF)
    assert result.outputs["3"]["value"] == [10], "an interrupt does not carry over into the next run"
    assert result.executed == ["2", "3"], "node 1 finished before the interrupt and stays cached"


def test_the_demo_loras_come_after_the_users_folders_only_when_asked(tmp_path):
    folders = Folders.configure([tmp_path / "mine"], tmp_path / "models", tmp_path / "out")
    assert api.Runtime(folders=folders).folders.lora_dirs == folders.lora_dirs, "not by default"
    rt = api.Runtime(folders=folders, demo_loras=True)
    assert rt.folders.lora_dirs == [*folders.lora_dirs, api.DEMO_LORA_DIR], "searched last"
    assert api.DEMO_LORA_DIR not in folders.lora_dirs, "the caller's Folders is not changed"
    again = api.Runtime(folders=dataclasses.replace(folders, lora_dirs=[api.DEMO_LORA_DIR]), demo_loras=True)
    assert again.folders.lora_dirs == [api.DEMO_LORA_DIR], "never listed twice"


def test_load_node_modules_imports_and_registers(node_registry, node_module, monkeypatch):
    first = node_module("loom_user_nodes_a", """
        from loraloom import register_node
        from loraloom.graph_runtime import Int, Output, node

        @register_node
        @node(category="user", inputs=[Int("value", 1)], outputs=[Output("USER_NUM")])
        class UserConst:
            def execute(self, value):
                return (value,)
    """)
    second = node_module("loom_user_nodes_b", "LOADED = True\n")
    assert api.load_node_modules([first]) == [first]
    assert "UserConst" in api.Runtime().registry
    monkeypatch.setenv(api.ENV_NODE_MODULES, f" {second} , ,")
    assert api.load_node_modules() == [second], "names come from LORALOOM_NODE_MODULES, blanks skipped"
    assert sys.modules[second].LOADED
    monkeypatch.delenv(api.ENV_NODE_MODULES)
    assert api.load_node_modules() == [], "no variable, no modules"


def test_load_node_modules_names_the_module_that_failed(node_module):
    with pytest.raises(LoomError) as missing:
        api.load_node_modules(["loom_no_such_module"])
    text = str(missing.value)
    assert "'loom_no_such_module'" in text and "PYTHONPATH" in text and "Fix:" in text, text
    assert isinstance(missing.value.__cause__, ImportError), "the import error stays attached"

    broken = node_module("loom_broken_nodes", "import loom_missing_dependency\n")
    with pytest.raises(LoomError) as inner:
        api.load_node_modules([broken])
    assert "'loom_broken_nodes'" in str(inner.value) and "loom_missing_dependency" in str(inner.value), \
        "the module that failed and the import inside it that failed are both named"


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="transformers' torchvision fallback notice shows only without torchvision")
def test_the_api_prints_no_torchvision_notice(tmp_path):
    """A pipeline built under the Python API (here a tiny preset run through ``Runtime``) prints no
    "requires torchvision" notice; the same run without importing ``loraloom.api`` first does."""
    run = ("from loraloom.graph_runtime import Runtime as Plain\n"
           "from loraloom.nodes import registry\n"
           "wf = {'1': {'class_type': 'LoadBase', 'inputs': {'source': 'tiny-sd15'}},\n"
           "      '2': {'class_type': 'Sample', 'inputs': {'model': ['1', 0], 'steps': 1, 'width': 64, 'height': 64}},\n"
           "      '3': {'class_type': 'PreviewImage', 'inputs': {'images': ['2', 0]}}}\n"
           f"Runtime(registry=registry(), output_dir={str(tmp_path)!r}).run(wf)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    with_api = subprocess.run([sys.executable, "-c", "from loraloom.api import Runtime\n" + run],
                              capture_output=True, text=True, env=env, timeout=600)
    assert with_api.returncode == 0, with_api.stderr
    assert "requires torchvision" not in with_api.stderr, with_api.stderr
    without = subprocess.run([sys.executable, "-c", "Runtime = None\n" + run.replace("Runtime(", "Plain(")],
                             capture_output=True, text=True, env=env, timeout=600)
    assert without.returncode == 0, without.stderr
    assert "requires torchvision" in without.stderr, "the notice this test hides must exist without loraloom.api"
