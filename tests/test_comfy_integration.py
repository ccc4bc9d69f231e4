"""The repo as a ComfyUI custom node pack: imported the way ComfyUI imports custom_nodes/<pack>, under
another package name, cheaply, and its nodes called the way ComfyUI's executor calls them."""

import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_as_comfyui_does(name="ComfyUI-LoRA-Loom"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_import_is_cheap_and_torch_free():
    code = "import loraloom, sys; print('torch' in sys.modules, 'diffusers' in sys.modules, len(loraloom.NODE_CLASS_MAPPINGS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["False", "False"], "importing the pack must not import torch or diffusers"
    assert int(out[2]) >= 8


def test_mappings_under_another_package_name():
    pack = load_as_comfyui_does()
    mappings = pack.NODE_CLASS_MAPPINGS
    for node_id in ("LoadBase", "LoadLoRA", "WeightedBlend", "PeftMerge", "Fuse", "Compile", "Sample", "SaveLoRA",
                    "SavePipeline", "SaveCheckpoint"):
        assert node_id in mappings, f"{node_id} missing from NODE_CLASS_MAPPINGS"
        cls = mappings[node_id]
        assert cls.CATEGORY.startswith("LoRA Loom"), cls.CATEGORY
        assert callable(getattr(cls, cls.FUNCTION)) and isinstance(cls.INPUT_TYPES(), dict)
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert "SaveImage" not in mappings and "PreviewImage" not in mappings, \
        "ComfyUI drops pack nodes with core ids; ours stand in for them headless only"
    for cls in mappings.values():
        for kind in cls.RETURN_TYPES:
            assert kind not in ("MODEL", "CLIP", "LORA"), "ComfyUI's own socket types carry other objects"


def test_nodes_run_as_comfyui_calls_them():
    pack = load_as_comfyui_does("loraloom_comfy_call")
    nodes = pack.NODE_CLASS_MAPPINGS

    def call(node_id, **inputs):
        cls = nodes[node_id]
        out = getattr(cls(), cls.FUNCTION)(**inputs)
        return out["result"] if isinstance(out, dict) else out

    (model,) = call("LoadBase", source="tiny-sd15", config="auto", dtype="fp32", device="cpu")
    (image,) = call("Sample", model=model, prompt="a cat", negative_prompt="", seed=1, steps=2, guidance=5.0,
                    width=64, height=64, scheduler="euler", batch_size=2, lora_scale=1.0)
    assert image.dtype == torch.float32 and tuple(image.shape) == (2, 64, 64, 3), "ComfyUI's IMAGE: [B, H, W, C]"
    assert 0.0 <= image.min() and image.max() <= 1.0


def pack_nodes():
    import loraloom

    return loraloom.NODE_CLASS_MAPPINGS


def test_comfyui_hooks(tmp_path, monkeypatch):
    """Inside ComfyUI (its folder_paths and comfy modules importable), LoadLoRA lists ComfyUI's loras
    folders and progress goes to ComfyUI's ProgressBar; its interrupt stops us."""
    from loraloom.comfy_integration import install_if_in_comfyui
    from loraloom.graph_runtime import context

    root, names = tmp_path / "comfy-loras", {"tiny-sdxl/kohya": "sdxl/style.safetensors"}
    (root / "sdxl").mkdir(parents=True)
    (root / "sdxl" / "style.safetensors").write_bytes(b"")  # only listed, never read
    calls = []
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda kind: [str(root)] if kind == "loras" else []
    folder_paths.models_dir = str(tmp_path / "models")
    folder_paths.get_output_directory = lambda: str(tmp_path / "output")
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            calls.append((value, total))

    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.interrupted = False

    def throw():
        if mm.interrupted:
            raise RuntimeError("Processing interrupted")

    mm.throw_exception_if_processing_interrupted = throw
    comfy.utils, comfy.model_management = utils, mm
    for name, mod in {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils,
                      "comfy.model_management": mm}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("LORALOOM_MAX_NODES", "5")
    previous = context.current_context()
    try:
        assert install_if_in_comfyui()
        limits = context.current_context().limits
        assert limits.max_nodes == 5, "the environment's limits hold in ComfyUI too"
        assert "LORALOOM_MAX_PIXELS=N" in limits.fix("max_pixels") and "--" not in limits.fix("max_pixels")
        from loraloom.nodes.lora import LoadLoRA

        assert names["tiny-sdxl/kohya"] in LoadLoRA.INPUT_TYPES()["required"]["lora_name"][0]
        # the advice of a refusal names ComfyUI's folders, never our command line's flags
        refused = {"SaveLoRA": ({"filename_prefix": "../x"}, "ComfyUI/output"),
                   "LoadLoRA": ({"lora_name": "../x.safetensors"}, "extra_model_paths.yaml"),
                   "LoadBase": ({"source": "/x.safetensors"}, None)}
        for node_id, (values, folder) in refused.items():
            answer = pack_nodes()[node_id].VALIDATE_INPUTS(**values)
            assert isinstance(answer, str), answer
            assert not re.search(r"--(lora|models|output)-dir\b", answer), answer
            assert folder is None or folder in answer, answer
        ctx = context.current_context()
        ctx.progress(1, 4)
        assert calls == [(1, 4)]
        mm.interrupted = True
        with pytest.raises(RuntimeError, match="interrupted"):
            ctx.progress(2, 4)
    finally:
        context.set_default_context(previous)


# --- our checks when ComfyUI queues a prompt (VALIDATE_INPUTS) ---

@pytest.fixture(scope="module")
def models_folder(tmp_path_factory):
    """A models folder holding a diffusers folder, a single-file checkpoint and our fixture LoRAs."""
    from loraloom.fixtures import UNET_PRESETS, write_fixtures

    models = tmp_path_factory.mktemp("models")
    (models / "sd15-folder").mkdir(parents=True)
    (models / "sd15-folder" / "model_index.json").write_text("{}")  # listed only, never read here
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "model.safetensors").write_bytes(b"")
    names = {k: p.relative_to(models / "loras").as_posix() for k, p in write_fixtures(models / "loras", presets=UNET_PRESETS).items()}
    return models, names


@pytest.fixture
def comfy_like_folders(models_folder, tmp_path, monkeypatch):
    """The default context (what a node class sees inside ComfyUI) over ``models_folder``; restored afterwards."""
    from loraloom.graph_runtime import Folders, context

    models, names = models_folder
    monkeypatch.setattr(context, "_default", context.ExecutionContext(
        folders=Folders([models / "loras"], models, tmp_path / "output")))
    return names


# (node, widget values, the input each refusal names). Each also fails `loraloom validate`.
REFUSED = [
    ("Sample", {"width": 130}, ["width"]),
    ("Sample", {"scheduler": "pndm", "steps": 2}, ["steps"]),
    ("Sample", {"steps": 0, "width": 60, "guidance": 51.0}, ["steps", "width", "guidance"]),
    ("LoadBase", {"source": "tiny-sd15", "config": "sd15-folder"}, ["config"]),
    ("LoadBase", {"source": "checkpoints/model.safetensors", "config": "auto"}, ["config"]),
    ("LoadBase", {"dtype": "fp64"}, ["dtype"]),
    ("SaveLoRA", {"filename_prefix": "../elsewhere/x"}, ["filename_prefix"]),
    ("SavePipeline", {"filename_prefix": "/tmp/x"}, ["filename_prefix"]),
    ("SaveCheckpoint", {"filename_prefix": "a/../../x"}, ["filename_prefix"]),
    ("LoadLoRA", {"lora_name": "../x.safetensors"}, ["lora_name"]),
    ("WeightedBlend", {"weight": 11.0}, ["weight"]),
]


def _widget_defaults(cls):
    return {inp.name: inp.default for inp in cls.SCHEMA.widgets if inp.has_default}


@pytest.mark.parametrize("node_id, values, names", REFUSED, ids=[f"{n}-{'-'.join(v)}" for n, v, _ in REFUSED])
def test_queue_check_refuses_with_the_messages_of_loraloom_validate(comfy_like_folders, node_id, values, names):
    import loraloom
    from loraloom.graph_runtime import ValidationError, current_context
    from loraloom.graph_runtime.graph import validate_prompt

    cls = loraloom.NODE_CLASS_MAPPINGS[node_id]
    given = {**_widget_defaults(cls), **values}
    answer = cls.VALIDATE_INPUTS(**given)  # as ComfyUI calls it: constants only, the links are not named
    assert isinstance(answer, str), f"{node_id} {values}: accepted at queue time"
    # the same node in a whole prompt through our own validation (what `loraloom validate` runs)
    sources = {"MODEL_RECIPE": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15"}},
               "LORA_WEIGHTS": {"class_type": "LoadLoRA",
                                "inputs": {"lora_name": comfy_like_folders["tiny-sd15/kohya"]}}}
    prompt = {"?": {"class_type": node_id, "inputs": dict(given)}}
    for inp in cls.SCHEMA.inputs:
        if not inp.is_widget and not inp.optional:
            prompt[inp.name] = sources[inp.type]
            prompt["?"]["inputs"][inp.name] = [inp.name, 0]
    with pytest.raises(ValidationError) as info:
        validate_prompt(prompt, loraloom.nodes.registry(), current_context().folders)
    expected = [e["details"] for e in info.value.node_errors["?"]["errors"]]
    assert answer.split("\n") == expected, "the same checks and messages as loraloom validate"
    for name in names:
        assert f"input '{name}'" in answer, f"the refusal names input {name!r}: {answer}"


def test_queue_check_passes_good_values_and_skips_linked_ones(comfy_like_folders):
    import loraloom

    for node_id, cls in loraloom.NODE_CLASS_MAPPINGS.items():
        values = _widget_defaults(cls)
        if node_id == "LoadLoRA":
            values["lora_name"] = comfy_like_folders["tiny-sd15/kohya"]
        assert cls.VALIDATE_INPUTS(**values) is True, f"{node_id} with its defaults: {cls.VALIDATE_INPUTS(**values)}"
    sample = loraloom.NODE_CLASS_MAPPINGS["Sample"]
    # A widget fed by a link arrives as None: its value is unknown, so a rule needing it waits for the run.
    assert sample.VALIDATE_INPUTS(scheduler="pndm", steps=None, width=None) is True
    assert isinstance(sample.VALIDATE_INPUTS(scheduler="pndm", steps=None, width=130), str)


def test_validate_inputs_names_every_widget_so_comfyuis_own_checks_give_way_to_ours():
    """ComfyUI passes VALIDATE_INPUTS the inputs its parameters name (inspect.getfullargspec(...).args)
    and skips its own range and list checks for those: every widget is named, no link and no **kwargs."""
    import inspect

    import loraloom

    for node_id, cls in loraloom.NODE_CLASS_MAPPINGS.items():
        spec = inspect.getfullargspec(cls.VALIDATE_INPUTS)
        assert spec.args[1:] == [inp.name for inp in cls.SCHEMA.widgets], node_id
        assert spec.varkw is None and "input_types" not in spec.args, node_id


# --- inside real ComfyUI ---
#
# Runs only when LORALOOM_COMFYUI names a ComfyUI folder (the one holding main.py); its Python is
# LORALOOM_COMFYUI_PYTHON, else <folder>/../venv/bin/python where that exists (the layout of a
# ComfyUI set up for these tests), else this interpreter. The pack must be importable by it: that
# Python needs our dependencies. ComfyUI starts with its own base folder here (--base-directory:
# custom_nodes, models, output, user), our pack linked into its custom_nodes.

COMFYUI = os.environ.get("LORALOOM_COMFYUI")
needs_comfyui = pytest.mark.skipif(not COMFYUI, reason="set LORALOOM_COMFYUI to a ComfyUI folder (with main.py) "
                                   "to run the pack inside real ComfyUI")


def _comfyui_python(folder: Path) -> str:
    if os.environ.get("LORALOOM_COMFYUI_PYTHON"):
        return os.environ["LORALOOM_COMFYUI_PYTHON"]
    venv = folder.parent / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class ComfyUI:
    """A ComfyUI server started for a test, spoken to over its HTTP API."""

    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        import json
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue ``prompt``, wait for it, return its history entry."""
        import time

        status, queued = self.call("POST", "/prompt", {"prompt": prompt})
        assert status == 200 and not queued["node_errors"], f"refused: {queued}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, history = self.call("GET", f"/history/{queued['prompt_id']}")
            if history and history[queued["prompt_id"]]["status"].get("completed") is not None:
                return history[queued["prompt_id"]]
            time.sleep(0.5)
        raise AssertionError(f"not done in {timeout} s; log:\n{self.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """ComfyUI with our pack, a LoRA folder of our fixtures, a diffusers folder and a checkpoint to list."""
    import socket
    import time

    from loraloom.fixtures import UNET_PRESETS, write_fixtures

    folder = Path(COMFYUI).resolve()
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "loraloom").symlink_to(ROOT, target_is_directory=True)
    models = base / "models"
    names = {k: p.relative_to(models / "loras").as_posix() for k, p in write_fixtures(models / "loras", presets=UNET_PRESETS).items()}
    (models / "diffusers" / "sd15").mkdir(parents=True)
    (models / "diffusers" / "sd15" / "model_index.json").write_text("{}")  # listed, never read
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "model.safetensors").write_bytes(b"")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = base / "comfyui.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([_comfyui_python(folder), str(folder / "main.py"), "--cpu", "--listen", "127.0.0.1",
                                    "--port", str(port), "--base-directory", str(base), "--disable-auto-launch"],
                                   cwd=base, stdout=out, stderr=subprocess.STDOUT)
    server = ComfyUI(f"http://127.0.0.1:{port}", log)
    server.names, server.base = names, base
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if server.call("GET", "/object_info/LoadLoRA")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, \
                f"ComfyUI did not start:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        info = server.call("GET", "/object_info/LoadLoRA")[1]
        assert info, f"ComfyUI did not load our pack:\n{log.read_text()[-3000:]}"
        yield server
    finally:
        process.terminate()
        process.wait(30)


def _full(node_id: str, **inputs) -> dict:
    """A prompt entry with every widget given (ComfyUI fills in no defaults)."""
    return {"class_type": node_id, "inputs": {**_widget_defaults(pack_nodes()[node_id]), **inputs}}


def _base(source="tiny-sd15", config="auto"):
    return _full("LoadBase", source=source, config=config, dtype="fp32", device="cpu")


def _sample(model, **kw):
    return _full("Sample", model=model, **{"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "guidance": 5.0,
                                           "scheduler": "euler", **kw})


def _save_image(images):  # ComfyUI's own SaveImage: our IMAGE is its IMAGE
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": "loom"}}


@needs_comfyui
def test_inside_comfyui_bad_values_are_refused_when_queued_with_our_messages(comfyui):
    lora = comfyui.names["tiny-sd15/kohya"]
    prompt = {
        "1": _base(), "2": _sample(["1", 0], width=130), "3": _save_image(["2", 0]),
        "4": _sample(["1", 0], scheduler="pndm", steps=2), "5": _save_image(["4", 0]),
        "6": _base(config="diffusers/sd15"), "7": _sample(["6", 0]), "8": _save_image(["7", 0]),
        "9": _base("checkpoints/model.safetensors"), "10": _sample(["9", 0]), "11": _save_image(["10", 0]),
        "12": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora}},
        "13": _full("SaveLoRA", lora=["12", 0], filename_prefix="../escape"),
        "14": {"class_type": "LoadLoRA", "inputs": {"lora_name": "../" + lora}},
        "15": _full("SaveLoRA", lora=["14", 0]),
        "16": _sample(["1", 0], prompt="x" * 20_001), "17": _save_image(["16", 0]),
    }
    status, body = comfyui.call("POST", "/prompt", {"prompt": prompt})
    assert status == 400, body
    errors = {nid: " | ".join(e["details"] for e in entry["errors"]) for nid, entry in body["node_errors"].items()}
    expected = {"2": "input 'width': 130 is not a multiple of 8", "4": "the fewest steps the pndm scheduler can take",
                "6": "preset 'tiny-sd15' needs no config", "9": "needs a config folder",
                "13": "output name '../escape' contains a '..' part", "14": "contains a '..' part",
                "16": "20001 characters is above the limit 20000"}
    for nid, text in expected.items():
        assert text in errors.get(nid, ""), f"node {nid}: {errors.get(nid)}"
    assert "Fix: give a name relative to ComfyUI/output" in errors["13"], errors["13"]
    assert "LORALOOM_MAX_TEXT_CHARS=N" in errors["16"] and "--max" not in errors["16"], errors["16"]
    assert set(errors) == set(expected), f"only the bad nodes are refused: {errors}"


@needs_comfyui
def test_inside_comfyui_a_good_prompt_runs_and_a_saved_lora_loads_next_time(comfyui):
    lora = comfyui.names["tiny-sd15/kohya"]
    prompt = {"1": _base(), "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora}},
              "3": _full("WeightedBlend", model=["1", 0], lora=["2", 0], weight=0.8),
              "4": _sample(["3", 0]), "5": _save_image(["4", 0]),
              "6": _full("SaveLoRA", lora=["2", 0], filename_prefix="loras/again", dtype="fp32")}
    done = comfyui.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    image = done["outputs"]["5"]["images"][0]
    assert (comfyui.base / "output" / image["subfolder"] / image["filename"]).is_file()

    saved = "loras/again_00001_.safetensors [output]"
    offered = comfyui.call("GET", "/object_info/LoadLoRA")[1]["LoadLoRA"]["input"]["required"]["lora_name"][0]
    assert saved in offered and lora in offered, offered
    prompt["2"]["inputs"]["lora_name"] = saved
    prompt["4"]["inputs"]["seed"] = 2
    again = comfyui.run(prompt)
    assert again["status"]["status_str"] == "success", again["status"]


@needs_comfyui
def test_inside_comfyui_a_failing_node_names_our_error_type_not_a_path(comfyui):
    prompt = {"1": _base(), "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": comfyui.names["tiny-sdxl/kohya"]}},
              "3": _full("WeightedBlend", model=["1", 0], lora=["2", 0], weight=0.8),
              "4": _sample(["3", 0]), "5": _save_image(["4", 0])}
    done = comfyui.run(prompt)
    errors = [data for kind, data in done["status"]["messages"] if kind == "execution_error"]
    assert errors, done["status"]
    assert errors[0]["exception_type"] == "loraloom.LoRAMatchError", errors[0]["exception_type"]
    assert "Fix: load it on an SDXL base" in errors[0]["exception_message"], errors[0]["exception_message"]


@needs_comfyui
def test_inside_comfyui_a_sweep_grid_expands_into_its_cells_and_draws_our_grid(comfyui, tmp_path):
    """SweepGrid inside ComfyUI expands into one copy of what feeds its image per cell and a node that
    draws the grid: the grid is the one our runtime draws for the same workflow. Not bit for bit: a
    plain ComfyUI run of one cell's workflow already differs from ours by one level in a few values
    (measured: 1 to 3 of the 12,288 values of a 64x64 tiny-sd15 image, ComfyUI 0.3.64, same torch), the
    float rounding of another process; the labels, layout and every other value are equal."""
    import numpy as np
    from PIL import Image

    from loraloom.api import Runtime

    lora = comfyui.names["tiny-sd15/kohya"]
    prompt = {"1": _base(), "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora}},
              "3": _full("WeightedBlend", model=["1", 0], lora=["2", 0], weight=0.8),
              "4": _sample(["3", 0]),
              "5": _full("SweepGrid", images=["4", 0], x_axis="3.weight=0.2,0.8", y_axis="4.seed=1,2"),
              "6": _save_image(["5", 0])}
    done = comfyui.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    shown = [image for out in done["outputs"].values() for image in out.get("images", [])
             if image["subfolder"].startswith("sweeps/")]
    assert [image["filename"] for image in shown] == ["grid.png"], done["outputs"]
    folder = comfyui.base / "output" / shown[0]["subfolder"]
    theirs = np.asarray(Image.open(folder / "grid.png").convert("RGB"))
    assert len((folder / "manifest.jsonl").read_text().splitlines()) == 4

    ours = Runtime(lora_dirs=[comfyui.base / "models" / "loras"], output_dir=tmp_path).run(prompt)
    ref = ours.outputs["5"]["images"][0]
    expected = np.asarray(Image.open(tmp_path / ref["subfolder"] / ref["filename"]).convert("RGB"))
    assert theirs.shape == expected.shape
    differ = theirs.astype(int) - expected
    assert abs(differ).max() <= 1 and (differ != 0).sum() <= 4 * 8, f"{(differ != 0).sum()} values differ"


@needs_comfyui
def test_inside_comfyui_a_sweep_grid_sets_inputs_of_comfyuis_own_nodes_typed(comfyui):
    """An axis on one of ComfyUI's own nodes (ImageScaleBy's FLOAT scale_by) gets numbers, not text."""
    import json

    prompt = {"1": _base(), "2": _sample(["1", 0]),
              "3": {"class_type": "ImageScaleBy", "inputs": {"image": ["2", 0], "upscale_method": "nearest-exact",
                                                             "scale_by": 1.0}},
              "4": _full("SweepGrid", images=["3", 0], x_axis="3.scale_by=0.5,1"),
              "5": _save_image(["4", 0])}
    done = comfyui.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    (grid,) = [image for out in done["outputs"].values() for image in out.get("images", [])
               if image["subfolder"].startswith("sweeps/")]
    folder = comfyui.base / "output" / grid["subfolder"]
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [r["overrides"] for r in records] == [{"3.scale_by": 0.5}, {"3.scale_by": 1.0}]
