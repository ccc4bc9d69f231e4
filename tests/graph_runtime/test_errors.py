"""The one error family: fields that survive re-raising, one rendering for the CLI, the server and
ComfyUI, every error class in the package a LoomError, and no code that branches on error text."""

import ast
import importlib
import json
import math
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
    assert err.startswith(f"error: {bad}: node 1 (X) input 'v': number 1e999 is not finite"), err


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


# ---------------------------------------------------------------- no error outside the family

_BUILTIN_ERRORS = {"ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError", "LookupError", "OSError",
                   "FileExistsError", "FileNotFoundError", "NotADirectoryError", "IsADirectoryError",
                   "PermissionError", "AttributeError", "NotImplementedError", "AssertionError", "Exception"}

# Every bare builtin exception the package may raise: each can only be reached by a bug in a caller
# inside the package (or is Python's own protocol), never by what a user gives. Keyed by (file,
# function, exception) so that moving a line does not break it. Anything else raises a LoomError.
PROGRAMMER_ERRORS = {
    # a module's __getattr__ must raise AttributeError: Python's attribute protocol (hasattr, imports)
    ("__init__.py", "__getattr__", "AttributeError"),
    ("lora/__init__.py", "__getattr__", "AttributeError"),
    ("bases/__init__.py", "__getattr__", "AttributeError"),
    ("lora/safefile.py", "__getattr__", "AttributeError"),
    # at() is called by our own code with field names; an unknown one is a typo in that code
    ("graph_runtime/errors.py", "at", "TypeError"),
    # `select` is a value the merge driver passes (merge_methods.CONTEXT), never a user's option
    ("lora/merge_ops.py", "magnitude_prune", "ValueError"),
    # majority_sign_method is checked by lora.merge.check_parameters (MergeError) before any maths runs
    ("lora/merge_ops.py", "elect_positive", "ValueError"),
    # delta() is given the module values our readers and converters build, nothing else
    ("lora/canonical.py", "delta", "TypeError"),
    # the status comes from the worker's own constants (SUCCESS, ERROR, INTERRUPTED)
    ("server/store.py", "finish", "ValueError"),
    # the save node's own block wrote nothing, or its name_for() numbers names into another folder: bugs in
    # the calling node, never a user's input
    ("atomic.py", "atomic_new", "FileNotFoundError"),
    ("atomic.py", "atomic_new", "ValueError"),
}


def _raised_builtins(path: Path):
    """(function, exception name, line) of every ``raise <builtin error>`` in one source file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Raise) and child.exc is not None:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                if isinstance(exc, ast.Name) and exc.id in _BUILTIN_ERRORS:
                    found.append((function, exc.id, child.lineno))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_no_bare_builtin_error_for_user_input():
    seen, hits = set(), []
    for rel, path in _package_sources():
        for function, name, line in _raised_builtins(path):
            site = (rel.as_posix(), function, name)
            seen.add(site)
            if site not in PROGRAMMER_ERRORS:
                hits.append(f"{rel}:{line} in {function}(): raise {name}")
    assert not hits, "raise a LoomError subclass with fields (or justify the site in PROGRAMMER_ERRORS):\n" + \
        "\n".join(hits)
    assert PROGRAMMER_ERRORS <= seen, f"stale allow-list entries: {sorted(PROGRAMMER_ERRORS - seen)}"


def test_the_raise_finder_finds_what_it_should(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f(x):\n    if x:\n        raise ValueError('bad')\n    raise KeyError\n"
                      "def g():\n    raise LoomError('ours')\n")
    assert _raised_builtins(source) == [("f", "ValueError", 3), ("f", "KeyError", 4)]


# Where "Fix:" may stay inside a string: the rendering itself, and a warning (not an error: it has no fields).
FIX_IN_TEXT = {"graph_runtime/errors.py", "graph_runtime/cache.py"}


def test_fix_is_a_field_not_text():
    hits = []
    for rel, path in _package_sources():
        if rel.as_posix() in FIX_IN_TEXT:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and "Fix:" in n.value \
                    and id(n) not in docstrings:
                hits.append(f"{rel}:{n.lineno}: {n.value[:60]!r}")
    assert not hits, "pass the advice as fix=...; the rendering adds 'Fix:'\n" + "\n".join(hits)


# ---------------------------------------------------------------- fields on every surface

@node(category="test", inputs=[Int("width", 64, max=10**6)], outputs=[], output_node=True)
class Size:
    """Checks its input during validation: returns a problem for odd sizes, raises one for huge ones."""

    @classmethod
    def check_inputs(cls, constants):
        from loraloom.graph_runtime import InputError

        width = constants["width"]
        if width > 4096:
            raise InputError(f"{width} is above 4096.", input="width", value=width, limit=4096, kind="too_big",
                             fix="lower it")
        if width % 8:
            return {"width": InputError(f"{width} is not a multiple of 8.", value=width, limit="a multiple of 8",
                                        kind="not_multiple_of_8", fix="round it to a multiple of 8")}
        return {}

    def execute(self, width):
        return {"ui": {"text": [str(width)]}}


@pytest.mark.parametrize("width, kind, limit", [(65, "not_multiple_of_8", "a multiple of 8"),
                                                (5000, "too_big", 4096)])
def test_check_inputs_problems_bring_their_fields(tmp_path, width, kind, limit):
    from loraloom.graph_runtime import ValidationError

    rt = Runtime(registry=NodeRegistry([Size]), output_dir=tmp_path)
    with pytest.raises(ValidationError) as info:
        rt.validate({"1": {"class_type": "Size", "inputs": {"width": width}}})
    (error,) = info.value.node_errors["1"]["errors"]
    extra = error["extra_info"]
    assert (extra["input_name"], extra["value"], extra["limit"], extra["kind"]) == ("width", width, limit, kind)
    assert extra["type"] == "loraloom.InputError" and extra["fix"] in error["details"]
    assert error["details"].startswith(f"node 1 (Size) input 'width': {width} is "), error["details"]
    assert error["details"].count("Fix:") == 1
    json.dumps(info.value.to_json())


def test_missing_node_type_has_its_fix_as_a_field(tmp_path):
    from loraloom.graph_runtime import ValidationError

    rt = Runtime(registry=NodeRegistry([Size]), output_dir=tmp_path)
    with pytest.raises(ValidationError) as info:
        rt.validate({"1": {"class_type": "Nope", "inputs": {}}, "2": {"class_type": "Size", "inputs": {}}})
    (error,) = info.value.node_errors["1"]["errors"]
    assert error["details"] == ("node 1 (Nope): no node type 'Nope' is registered. Fix: check the spelling, or "
                                "install the pack that provides it")
    assert (error["extra_info"]["kind"], error["extra_info"]["value"]) == ("missing_node_type", "Nope")
    assert error["extra_info"]["fix"] == "check the spelling, or install the pack that provides it"


def test_validate_json_carries_the_fields(tmp_path, capsys):
    from loraloom.cli import main

    workflow = ROOT / "workflows" / "api" / "merge_dare_api.json"
    assert main(["validate", str(workflow), "--set", "4.density=0", "--json", "--output-dir", str(tmp_path)]) != 0
    out = json.loads(capsys.readouterr().out)
    (error,) = out["node_errors"]["4"]["errors"]
    extra = error["extra_info"]
    assert (extra["input_name"], extra["value"], extra["limit"], extra["kind"]) == ("density", 0.0, "(0, 1]",
                                                                                    "bad_option")
    assert extra["fix"] and error["details"].endswith(f"Fix: {extra['fix']}"), error["details"]


def test_execution_error_event_carries_the_cause_fields(tmp_path):
    events = []
    rt = Runtime(registry=NodeRegistry([FindsNothing]), lora_dirs=[tmp_path], output_dir=tmp_path)
    with pytest.raises(ExecutionError):
        rt.run({"1": {"class_type": "FindsNothing", "inputs": {"value": 3}}}, on_event=events.append)
    (event,) = [e for e in events if e["event"] == "execution_error"]
    for key in ("node_id", "node_type", "exception_message", "exception_type", "traceback", "current_inputs"):
        assert key in event, f"ComfyUI's key {key} must stay"
    extra = event["extra_info"]
    assert (extra["kind"], extra["value"], extra["type"]) == ("not_found", "missing_3.safetensors",
                                                             "loraloom.PathError")
    assert extra["fix"] == CLI_ADVICE.missing["loras"]
    json.dumps(event["extra_info"])


# ---------------------------------------------------------------- converted sites, real calls

def test_cache_budget_is_an_input_error(tmp_path, capsys):
    from loraloom.cli import main
    from loraloom.graph_runtime import CacheStore, InputError

    for bad in (-1, -math.inf, "8GB", True):
        with pytest.raises(InputError) as info:
            Runtime(registry=NodeRegistry([Size]), output_dir=tmp_path, cache_bytes=bad)
        exc = info.value
        assert (exc.key, exc.value, exc.limit, exc.kind) == ("cache_bytes", bad, 0, "bad_cache_budget")
        assert isinstance(exc, ValueError) and str(exc).endswith(f"Fix: {exc.fix}")
    assert CacheStore(math.inf).max_bytes == math.inf and CacheStore(0).max_bytes == 0
    workflow = tmp_path / "w.json"
    workflow.write_text('{"1": {"class_type": "PreviewImage", "inputs": {}}}')
    with pytest.raises(SystemExit) as exited:  # on the command line a bad flag value is a usage error
        main(["run", str(workflow), "--cache-bytes", "-5", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "argument --cache-bytes: -5 is below 0" in err, err


def test_save_checkpoint_over_an_existing_file(tmp_path):
    from loraloom.atomic import TargetExistsError
    from loraloom.bases import export
    from loraloom.bases.arch import BaseModelError
    from loraloom.bases.presets import build_pipeline

    pipe = build_pipeline("tiny-sd15", dtype="fp32", device="cpu")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    with pytest.raises(FileExistsError) as info:  # also what callers catching the builtin see
        export.save_single_file(pipe, taken)
    exc = info.value
    assert isinstance(exc, TargetExistsError) and isinstance(exc, LoomError)
    assert (exc.file, exc.kind, exc.fix) == (str(taken), "exists", "choose a new path or remove it first")
    assert str(exc) == f"{taken}: already exists. Fix: choose a new path or remove it first"
    assert taken.read_bytes() == b"mine", "the file is left as it was"
    with pytest.raises(BaseModelError) as info:
        export.save_single_file(pipe, tmp_path / "model.ckpt")
    assert (info.value.value, info.value.limit, info.value.kind) == (".ckpt", ".safetensors", "bad_suffix")
    full = tmp_path / "folder"
    (full / "sub").mkdir(parents=True)
    with pytest.raises(TargetExistsError) as info:
        export.save_diffusers_folder(pipe, full)
    assert (info.value.file, info.value.value) == (str(full), "a folder with files")
    assert list(full.iterdir()) == [full / "sub"], "nothing written into the existing folder"


def test_limits_refusal_is_an_input_error():
    from loraloom.graph_runtime import InputError
    from loraloom.lora.safefile import Limits

    with pytest.raises(InputError) as info:
        Limits(max_tensors=0)
    exc = info.value
    assert (exc.key, exc.value, exc.limit, exc.kind) == ("Limits.max_tensors", 0, 1, "bad_limit")
    assert str(exc) == ("Limits.max_tensors must be a positive int, got 0. Fix: give a whole number of at least 1 "
                        "(the default is 50000)")


def test_merge_method_declaration_is_a_schema_error():
    from loraloom.graph_runtime import SchemaError
    from loraloom.lora.merge_methods import CAT, MergeMethod

    with pytest.raises(SchemaError) as info:
        MergeMethod("Bad", CAT, "test")
    exc = info.value
    assert isinstance(exc, TypeError), "as a declaration error always was"
    assert (exc.key, exc.kind, exc.fix) == ("Bad", "bad_declaration", "name it like 'ties_svd'")
    assert str(exc).endswith("name 'Bad' is not snake_case. Fix: name it like 'ties_svd'"), str(exc)


def test_fixtures_into_a_file_is_refused_on_the_command_line(tmp_path, capsys):
    from loraloom.cli import main

    taken = tmp_path / "a-file"
    taken.write_text("x")
    assert main(["fixtures", str(taken)]) == 1
    assert capsys.readouterr().err == (f"error: {taken}: is a file, not a folder to write LoRAs into. "
                                       "Fix: name a folder (it is created if missing)\n")


def test_server_refusal_has_its_fix_as_a_field():
    pytest.importorskip("aiohttp")
    from loraloom.server.userdata import Conflict
    from loraloom.server.security import reject

    body = json.loads(reject(403, "host_not_allowed", "Host 'evil' is not allowed.", value="evil",
                             fix="start the server with --allow-host NAME").text)
    assert body["error"]["message"] == "Host 'evil' is not allowed. Fix: start the server with --allow-host NAME"
    assert body["error"]["extra_info"]["fix"] == "start the server with --allow-host NAME"
    assert body["error"]["extra_info"]["value"] == "evil"
    exc = Conflict("workflows/a.json")
    assert (exc.value, exc.fix, exc.kind) == ("workflows/a.json", "pass overwrite=true to replace it", "exists")
    assert str(exc) == "user file 'workflows/a.json' exists. Fix: pass overwrite=true to replace it"
