"""The one error family: fields that survive re-raising, one rendering for the CLI, the server and
ComfyUI, every error class in the package a LoomError, and no code that branches on error text."""

import ast
import importlib
import json
import pickle
import pkgutil
import re
import sys
import types
from pathlib import Path

import pytest

import loraloom
from loraloom.graph_runtime import Int, NodeRegistry, Runtime, current_context, node
from loraloom.graph_runtime import context as context_mod
from loraloom.graph_runtime.errors import ExecutionError, LoomError, PathError, WorkflowError
from loraloom.graph_runtime.jsonio import loads_strict
from loraloom.graph_runtime.paths import CLI_ADVICE, Folders

ROOT = Path(loraloom.__file__).resolve().parent


def comfyui_type_name(klass) -> str:
    """What ComfyUI 0.3.64 shows as an error's type (execution.full_type_name): the class's
    ``__module__`` + "." + ``__qualname__``, or the bare name for builtins."""
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else module + "." + klass.__qualname__


def test_render_puts_where_message_and_fix_in_one_line():
    exc = PathError("9.0 is above max 4.0", node="7", class_type="WeightedBlend", input="weight", value=9.0,
                    limit=4.0, fix="lower it")
    assert str(exc) == "node 7 (WeightedBlend) input 'weight': 9.0 is above max 4.0 Fix: lower it"
    assert (exc.value, exc.limit, exc.fix) == (9.0, 4.0, "lower it")


def test_fields_survive_reraise_with_more_location():
    from loraloom.lora.errors import LoRAFormatError

    def inner():
        raise LoRAFormatError("rank 4 and 8 disagree.", key="unet.x", value=8, limit=4, fix="re-export it")

    with pytest.raises(LoRAFormatError) as info:
        try:
            inner()
        except LoomError as exc:
            raise exc.at(file="a.safetensors", key="other")
    exc = info.value
    assert (exc.file, exc.path, exc.key, exc.value, exc.limit, exc.fix) == (
        "a.safetensors", "a.safetensors", "unet.x", 8, 4, "re-export it"), "at() fills only what is unset"
    assert str(exc) == "a.safetensors: rank 4 and 8 disagree. Fix: re-export it"


def test_reader_names_the_file_once():
    """lora/readers adds the file to errors raised while grouping keys, without naming it twice."""
    import torch

    from loraloom.lora.errors import LoRAError
    from loraloom.lora.readers import lora_from_state_dict

    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(LoRAError) as info:
        lora_from_state_dict(tensors, path="bad.safetensors")
    assert info.value.file == "bad.safetensors" and str(info.value).count("bad.safetensors") == 1
    assert info.value.kind == "error" and "ranks disagree" in info.value.message


def test_pickle_keeps_every_field_and_class():
    from loraloom.lora.safefile import LoRAFileError

    for exc in (PathError("gone", file="x.json", value="x", fix="put it back", kind="not_found"),
                LoRAFileError("f.safetensors", "too many tensors.", key="k", value=9, limit=8, fix="raise it"),
                ExecutionError("3", "LoadLoRA", "boom", traceback=["t"], inputs={"a": 1})):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert back.fields() == exc.fields()


def test_execution_error_carries_the_cause_fields():
    cause = PathError("lora 'x' not found in /l.", value="x", limit="/l", fix="put it there", kind="not_found")
    exc = ExecutionError("4", "LoadLoRA", f"PathError: {cause}", cause=cause)
    assert (exc.node, exc.class_type, exc.value, exc.limit, exc.fix, exc.kind) == (
        "4", "LoadLoRA", "x", "/l", "put it there", "not_found")
    assert str(exc).count("Fix:") == 1, "the cause's text holds the fix once"


@node(category="test", inputs=[Int("value", 1)], outputs=[], output_node=True)
class FindsNothing:
    """Looks for a LoRA file that is not there (validation cannot know: the name is computed)."""

    def execute(self, value):
        current_context().folders.find("loras", f"missing_{value}.safetensors")


def test_runtime_node_failure_keeps_the_fix(tmp_path):
    """A node that cannot find its file: the run's ExecutionError names the node and keeps the fix."""
    rt = Runtime(registry=NodeRegistry([FindsNothing]), lora_dirs=[tmp_path], output_dir=tmp_path)
    with pytest.raises(ExecutionError) as info:
        rt.run({"1": {"class_type": "FindsNothing", "inputs": {"value": 3}}})
    exc = info.value
    assert (exc.node, exc.class_type, exc.kind, exc.value) == ("1", "FindsNothing", "not_found",
                                                                "missing_3.safetensors")
    assert exc.fix == CLI_ADVICE.missing["loras"] and str(exc).endswith(f"Fix: {exc.fix}")
    assert exc.exception_type == "loraloom.PathError"


def test_cli_renders_error_fields(tmp_path, capsys):
    from loraloom.cli import main

    bad = tmp_path / "w.json"
    bad.write_text('{"1": {"class_type": "X", "inputs": {"v": 1e999}}}')
    assert main(["validate", str(bad)]) != 0
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: number 1e999 is not finite"), err


def test_cli_set_refuses_overflow_and_keeps_text():
    from loraloom.cli import parse_sets

    assert parse_sets(["5.text=NaN", "4.weight=0.5"]) == {"5.text": "NaN", "4.weight": 0.5}
    with pytest.raises(WorkflowError) as info:
        parse_sets(["4.weight=1e999"])
    assert info.value.kind == "overflow" and info.value.file == "--set 4.weight"


def test_jsonio_kinds():
    with pytest.raises(WorkflowError) as info:
        loads_strict('{"a": NaN}', source="w.json")
    assert (info.value.kind, info.value.value, info.value.file) == ("not_finite", "NaN", "w.json")
    assert str(info.value) == "w.json: NaN is not a finite number; JSON workflows may hold only finite numbers"


def test_server_error_body_carries_the_fields():
    pytest.importorskip("aiohttp")
    from loraloom.server.security import error_body

    exc = PathError("name 'a/../b' contains a '..' part.", value="a/../b", fix="give a relative path",
                    kind="bad_name")
    body = error_body("bad_path", str(exc), cause=exc)
    assert body["error"]["message"] == str(exc)
    assert body["error"]["extra_info"] == {"value": "a/../b", "fix": "give a relative path", "kind": "bad_name",
                                           "message": "name 'a/../b' contains a '..' part.",
                                           "type": "loraloom.PathError"}
    json.dumps(body)  # the fields are JSON-safe


def test_fields_are_json_safe():
    exc = LoomError("x", value=Path("/a"), limit=(1, 2), file=Path("f"))
    out = json.loads(json.dumps(exc.fields()))
    assert out["value"] == repr(Path("/a")) and out["limit"] == [1, 2] and out["file"] == "f"


def _package_modules():
    """Every module of the package that imports here (the server's need the editor extra)."""
    names = []
    for info in pkgutil.walk_packages([str(ROOT)], prefix="loraloom."):
        if ".tests" in info.name or ".bench" in info.name or info.name.endswith("__main__"):
            continue
        try:
            names.append(importlib.import_module(info.name))
        except ImportError:
            continue
    return names


def _package_sources():
    """(relative path, path) of every source file of the installed package: not tests, benchmarks,
    a build folder or hidden folders (a .venv inside the checkout)."""
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in ("tests", "bench", "build") and not rel.parts[0].startswith("."):
            yield rel, path


def test_every_error_class_is_a_loom_error_and_shows_as_ours():
    defined = {}
    for rel, path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = [ast.unparse(b) for b in node.bases]
                if any(re.search(r"(Error|Exception|Conflict|DuplicateId|Interrupted)$", b) for b in bases):
                    defined[node.name] = ".".join(("loraloom", *rel.with_suffix("").parts))
    assert len(defined) >= 15, defined
    for name, module in defined.items():
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError:  # the server's modules need the editor extra
            continue
        assert issubclass(cls, LoomError), f"{module}.{name} is not a LoomError"
        assert comfyui_type_name(cls) == f"loraloom.{name}", "ComfyUI must show our name, not a path"
        assert getattr(loraloom, name) is cls, f"loraloom.{name} must be importable (pickling, the shown type)"


def test_a_subclass_outside_the_package_keeps_its_module():
    class PackError(LoomError):
        pass

    assert PackError.__module__ == __name__ and PathError.__module__ == "loraloom"


_TEXT_BRANCH = re.compile(
    r"""(["'][^"']*["']\s+(not\s+)?in\s+(str|repr)\(\s*(e|ex|exc|err|error)\s*\))"""  # "x" in str(exc)
    r"""|((str|repr)\(\s*(e|ex|exc|err|error)\s*\)\s*(==|!=|\.startswith|\.endswith|\.find|\.index))"""
    r"""|(\b(e|ex|exc|err|error)\.args\[)"""
    r"""|(\b(e|ex|exc|err|error)\.message\s*(==|!=|\.startswith|\.endswith))"""
    r"""|(re\.(search|match|fullmatch)\([^)]*(str|repr)\(\s*(e|ex|exc|err|error)\s*\))""")


def test_no_code_branches_on_error_text():
    hits = []
    for rel, path in _package_sources():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if _TEXT_BRANCH.search(line):
                hits.append(f"{rel}:{lineno}: {line.strip()}")
    assert not hits, "branch on exc.kind or the class, not on the message:\n" + "\n".join(hits)


def test_the_text_pattern_finds_what_it_should():
    assert _TEXT_BRANCH.search('if "not finite" in str(exc):')
    assert _TEXT_BRANCH.search("if str(e).startswith('x'):")
    assert not _TEXT_BRANCH.search('return _error(400, "bad", str(exc))')


@pytest.fixture
def in_comfyui(monkeypatch, tmp_path):
    """ComfyUI's folder_paths and the two comfy modules our integration imports, as ComfyUI lays out
    its folders: ComfyUI/models/loras, ComfyUI/output. The default context is restored afterwards."""
    comfy_root = tmp_path / "ComfyUI"
    (comfy_root / "models" / "loras").mkdir(parents=True)
    (comfy_root / "output").mkdir()
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(comfy_root / "models")
    folder_paths.get_folder_paths = lambda kind: [str(comfy_root / "models" / kind)]
    folder_paths.get_output_directory = lambda: str(comfy_root / "output")
    comfy = types.ModuleType("comfy")
    for sub in ("model_management", "utils"):
        module = types.ModuleType(f"comfy.{sub}")
        setattr(comfy, sub, module)
        monkeypatch.setitem(sys.modules, f"comfy.{sub}", module)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.setattr(context_mod, "_default", None)
    from loraloom.comfy_integration import install_if_in_comfyui

    assert install_if_in_comfyui()
    return comfy_root


def test_inside_comfyui_the_fix_names_comfyuis_folders(in_comfyui):
    from loraloom.nodes.lora import LoadLoRA

    with pytest.raises(PathError) as info:
        LoadLoRA().execute("missing.safetensors")
    text = str(info.value)
    assert "ComfyUI/models/loras" in text and "extra_model_paths.yaml" in text, text
    assert "--lora-dir" not in text and "--models-dir" not in text, "no CLI flags inside ComfyUI"
    assert comfyui_type_name(type(info.value)) == "loraloom.PathError"
    with pytest.raises(PathError) as info:
        context_mod.current_context().folders.find("loras", "../escape.safetensors")
    assert "extra_model_paths.yaml" in str(info.value) and "--lora-dir" not in str(info.value)


def test_pack_imported_under_its_folder_path_shows_our_type(tmp_path):
    """ComfyUI imports a custom node folder under its path as module name (dots replaced), so without
    care the type it shows would read '/.../custom_nodes/loraloom.graph_runtime.errors.PathError'."""
    import importlib.util

    name = "/opt/ComfyUI/custom_nodes/loraloom"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    try:
        spec.loader.exec_module(pack)
        errors = sys.modules[f"{name}.graph_runtime.errors"]
        assert errors.PathError is not PathError, "a second copy of the package, as inside ComfyUI"
        paths = sys.modules[f"{name}.graph_runtime.paths"]
        with pytest.raises(errors.PathError) as info:
            paths.Folders([tmp_path], tmp_path, tmp_path).find("loras", "missing.safetensors")
        assert comfyui_type_name(type(info.value)) == "loraloom.PathError"
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_outside_comfyui_the_fix_names_the_flags(tmp_path):
    folders = Folders([tmp_path], tmp_path, tmp_path)
    with pytest.raises(PathError) as info:
        folders.find("loras", "missing.safetensors")
    assert str(info.value).endswith("Fix: put it there or add its folder (--lora-dir / --models-dir)")
