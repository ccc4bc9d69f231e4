"""Sample on Flux and SD3.5: the node's image is what FluxPipeline / StableDiffusion3Pipeline give
for the same inputs; Flux's guidance is its distilled guidance and it takes no negative prompt; both
take the flow-matching schedulers only."""
import pytest
import torch

from loraloom.api import Runtime
from loraloom.bases.presets import build_pipeline
from loraloom.graph_runtime import ExecutionError
from loraloom.nodes.sample import FLOW_SCHEDULERS

STEPS, SIZE, SEED = 3, 64, 5


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit-sample")
    return Runtime(models_dir=root / "models", output_dir=root / "out")


def _run(rt, preset, **inputs):
    sample = {"model": ["1", 0], "prompt": "a red circle", "negative_prompt": "", "steps": STEPS, "width": SIZE,
              "height": SIZE, "seed": SEED, "guidance": 3.5}
    sample.update(inputs)
    wf = {"1": {"class_type": "LoadBase", "inputs": {"source": preset, "dtype": "fp32", "device": "cpu"}},
          "2": {"class_type": "Sample", "inputs": sample},
          "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    return rt.run(wf).value("2")


def _diffusers(preset, **call):
    pipe = build_pipeline(preset, dtype="fp32", device="cpu")
    out = pipe(prompt="a red circle", num_inference_steps=STEPS, width=SIZE, height=SIZE,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", **call)
    return out.images.float().clamp(0, 1).permute(0, 2, 3, 1)


def test_flux_sample_is_flux_pipeline_with_distilled_guidance(rt):
    ours = _run(rt, "tiny-flux")
    assert torch.equal(ours, _diffusers("tiny-flux", guidance_scale=3.5)), "same inputs as FluxPipeline, same image"
    assert torch.equal(_run(rt, "tiny-flux", scheduler="euler"), ours), "euler is Flux's own flow-matching Euler"
    other = _run(rt, "tiny-flux", guidance=1.0)
    assert not torch.equal(other, ours), "guidance is the model's guidance input"


def test_sd3_sample_is_sd3_pipeline_with_cfg_and_negative_prompt(rt):
    ours = _run(rt, "tiny-sd3", negative_prompt="blurry", guidance=5.0)
    want = _diffusers("tiny-sd3", negative_prompt="blurry", guidance_scale=5.0)
    assert torch.equal(ours, want), f"differs from StableDiffusion3Pipeline by {(ours - want).abs().max():.2e}"
    assert not torch.equal(_run(rt, "tiny-sd3", negative_prompt="", guidance=5.0), ours), "the negative prompt is used"
    rt.cache.clear()
    assert torch.equal(_run(rt, "tiny-sd3", negative_prompt="blurry", guidance=5.0), ours), "same seed, same image"


def test_flux_refuses_a_negative_prompt(rt):
    with pytest.raises(ExecutionError, match="input 'negative_prompt': Flux takes no negative prompt.*Fix: leave "
                                             "negative_prompt empty"):
        _run(rt, "tiny-flux", negative_prompt="blurry")


@pytest.mark.parametrize("preset, label", [("tiny-flux", "Flux"), ("tiny-sd3", "SD3.5")])
def test_noise_prediction_schedulers_are_refused_on_flow_models(rt, preset, label):
    with pytest.raises(ExecutionError, match=f"input 'scheduler': scheduler 'ddim' is for noise-prediction \\(UNet\\) "
                                             f"models; {label} is a flow-matching model and samples with: "
                                             f"{', '.join(FLOW_SCHEDULERS)}"):
        _run(rt, preset, scheduler="ddim")


@pytest.mark.parametrize("preset", ["tiny-flux", "tiny-sd3"])
def test_sizes_must_be_multiples_of_16(rt, preset):
    with pytest.raises(ExecutionError, match="input 'height': 72 is not a multiple of 16: .* works on 16x16 pixel "
                                             "blocks.*Fix: use 64 or 80"):
        _run(rt, preset, height=72)
