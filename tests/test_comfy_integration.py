"""The repo as a ComfyUI custom node pack: imported the way ComfyUI imports custom_nodes/<pack>, under
another package name, cheaply, and its nodes called the way ComfyUI's executor calls them."""

import importlib.util
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
    old_ids = ("LoadBase", "LoadLoRA", "WeightedBlend", "PeftMerge", "Fuse", "Compile", "Sample", "SaveLoRA",
               "SavePipeline", "SaveCheckpoint")
    for node_id in old_ids + tuple("LoraLoom" + old for old in old_ids):  # old ids: deprecated aliases
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
        if cls.SCHEMA.id == "LoraLoomLoadLoRA":
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
