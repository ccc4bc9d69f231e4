"""Fixtures for node tests: demo LoRA files written by our fixture generator, and a Runtime over them."""

import shutil

import pytest

from loraloom import Runtime
from loraloom.graph_runtime import Int, Output, String, node


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory):
    """LoRA fixture files for every preset, in every format (read-only: copy before editing)."""
    from loraloom.fixtures import write_fixtures

    root = tmp_path_factory.mktemp("loras")
    paths = write_fixtures(root)
    return root, {k: p.relative_to(root).as_posix() for k, p in paths.items()}


@pytest.fixture
def loras_dir(lora_files, tmp_path):
    """A private copy of the fixture LoRA folder (tests may edit files in it)."""
    root, names = lora_files
    target = tmp_path / "loras"
    shutil.copytree(root, target)
    return target, names


@pytest.fixture
def runtime(loras_dir, tmp_path):
    root, names = loras_dir
    # demo_loras: the merge tests use the shipped demo LoRAs (rank 8 everywhere) besides the fixtures
    rt = Runtime(lora_dirs=[root], models_dir=tmp_path / "models", output_dir=tmp_path / "out", demo_loras=True)
    rt.names = names
    return rt


# Workflow builders shared by the node test files; each is a fixture that hands out the function.

SIZE, STEPS = 64, 3


def _sample_inputs(model_link, **kw):
    inputs = {"model": model_link, "prompt": "a cat", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 3,
              "guidance": 5.0}
    inputs.update(kw)
    return inputs


def _blend_workflow(names, preset="tiny-sdxl", w=(0.7, 0.8), te=None, blocks=""):
    a, b = names[f"{preset}/diffusers"], names[f"{preset}/diffusers-nometa"]
    return {
        "1": {"class_type": "LoadBase", "inputs": {"source": preset, "dtype": "fp32", "device": "cpu"}},
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": a}},
        "3": {"class_type": "LoadLoRA", "inputs": {"lora_name": b}},
        "4": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": w[0],
                                                        "text_encoder_weight": w[0] if te is None else te,
                                                        "block_weights": blocks, "lora_2": ["3", 0],
                                                        "weight_2": w[1]}},
        "5": {"class_type": "Sample", "inputs": _sample_inputs(["4", 0])},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def _with_fused_branch(wf, fuse_scale=1.0, adapter_names="", **sample):
    """Add Fuse (7) on the blend, Sample (8, ``sample`` overrides its inputs) and PreviewImage (9)."""
    wf["7"] = {"class_type": "Fuse", "inputs": {"model": ["4", 0], "lora_scale": fuse_scale,
                                                "adapter_names": adapter_names}}
    wf["8"] = {"class_type": "Sample", "inputs": _sample_inputs(["7", 0], **sample)}
    wf["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    return wf


def _reference_image(runtime, preset, files, weights, fuse=False):
    """The same LoRAs through diffusers' own load_lora_weights + set_adapters (+ fuse_lora)."""
    import torch

    from loraloom.bases.presets import build_pipeline

    pipe = build_pipeline(preset, dtype="fp32", device="cpu")
    root = runtime.folders.lora_dirs[0]
    for i, name in enumerate(files):
        pipe.load_lora_weights(str(root / name), adapter_name=f"l{i}")
    pipe.set_adapters([f"l{i}" for i in range(len(files))], adapter_weights=list(weights))
    if fuse:
        pipe.fuse_lora(adapter_names=[f"l{i}" for i in range(len(files))])
    out = pipe(prompt="a cat", num_inference_steps=STEPS, width=SIZE, height=SIZE, guidance_scale=5.0,
               generator=torch.Generator("cpu").manual_seed(3), output_type="pt")
    return out.images.permute(0, 2, 3, 1)


def _sample_wf(**inputs):
    base = {"model": ["1", 0], "prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}
    base.update(inputs)
    return {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "dtype": "fp32", "device": "cpu"}},
            "2": {"class_type": "Sample", "inputs": base},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


def _blend(lora, weight=1.0, te=1.0, blocks=""):
    return {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sdxl", "dtype": "fp32", "device": "cpu"}},
            "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora}},
            "4": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": weight,
                                                            "text_encoder_weight": te, "block_weights": blocks}},
            "5": {"class_type": "Sample", "inputs": {"model": ["4", 0], "steps": 2, "width": 64, "height": 64}},
            "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}


@pytest.fixture
def sample_inputs():
    """``sample_inputs(model_link, **kw)``: Sample's inputs (64 px, 3 steps, seed 3, guidance 5)."""
    return _sample_inputs


@pytest.fixture
def blend_workflow():
    """``blend_workflow(names, preset="tiny-sdxl", w=(0.7, 0.8), te=None, blocks="")``: LoadBase (1),
    two LoadLoRA (2, 3), WeightedBlend (4), Sample (5), PreviewImage (6)."""
    return _blend_workflow


@pytest.fixture
def with_fused_branch():
    """``with_fused_branch(wf, fuse_scale=1.0, adapter_names="", **sample)``: see :func:`_with_fused_branch`."""
    return _with_fused_branch


@pytest.fixture
def reference_image():
    """``reference_image(runtime, preset, files, weights, fuse=False)``: see :func:`_reference_image`."""
    return _reference_image


@pytest.fixture
def sample_wf():
    """``sample_wf(**inputs)``: LoadBase tiny-sd15 (1), Sample (2, 64 px, 2 steps, seed 7), PreviewImage (3)."""
    return _sample_wf


@pytest.fixture
def blend():
    """``blend(lora, weight=1.0, te=1.0, blocks="")``: one LoRA on tiny-sdxl: LoadBase (1), LoadLoRA (2),
    WeightedBlend (4), Sample (5), PreviewImage (6)."""
    return _blend


@node(category="test", inputs=[Int("level", 0, min=0, max=255), Int("batch", 1, min=1, max=8), String("label", "")],
      outputs=[Output("IMAGE", "images")])
class SolidImage:
    """``batch`` 16x16 images of one grey level: something to save without sampling. ``label`` is a
    string widget for filename_prefix references."""

    def execute(self, level, batch, label):
        import torch

        return (torch.full((batch, 16, 16, 3), level / 255.0),)


@pytest.fixture
def solid_image():
    """The SolidImage node class (``level``, ``batch``, ``label`` -> IMAGE); add it with ``Runtime(nodes=[...])``
    or ``runtime.register``."""
    return SolidImage
