"""Sample on Flux and SD3.5: the node's image is what FluxPipeline / StableDiffusion3Pipeline give
for the same inputs; Flux's guidance is its distilled guidance and it takes no negative prompt; both
take the flow-matching schedulers only."""
import functools
import json
import math
import re

import diffusers
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from loraloom.api import Runtime
from loraloom.bases.presets import build_pipeline
from loraloom.graph_runtime import ExecutionError, InputError, Link, Output, ValidationError, node
from loraloom.nodes.common import MODEL
from loraloom.nodes.sample import make_scheduler, schedulers_for

STEPS, SIZE, SEED = 3, 64, 5


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit-sample")
    return Runtime(models_dir=root / "models", output_dir=root / "out")


def _workflow(source, model_nodes=(), config="auto", **inputs):
    """LoadBase (node 1) -> the ``model_nodes`` (nodes 10, 11, ...: class and inputs) -> Sample (2) -> PreviewImage."""
    sample = {"model": ["1", 0], "prompt": "a red circle", "negative_prompt": "", "steps": STEPS, "width": SIZE,
              "height": SIZE, "seed": SEED, "guidance": 3.5, **inputs}
    wf = {"1": {"class_type": "LoadBase", "inputs": {"source": source, "config": config, "dtype": "fp32",
                                                     "device": "cpu"}}}
    for i, (class_type, node_inputs) in enumerate(model_nodes, start=10):
        wf[str(i)] = {"class_type": class_type, "inputs": {"model": sample["model"], **node_inputs}}
        sample["model"] = [str(i), 0]
    wf["2"] = {"class_type": "Sample", "inputs": sample}
    wf["3"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    return wf


def _run(rt, preset, **inputs):
    return rt.run(_workflow(preset, **inputs)).value("2")


def _diffusers(preset, prepare=None, **call):
    pipe = build_pipeline(preset, dtype="fp32", device="cpu")
    if prepare is not None:
        prepare(pipe)
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


REFUSED_ON_FLUX = {"negative_prompt": "blurry", "width": 72, "scheduler": "ddim"}
REFUSALS = ["node 2 (Sample) input 'width': 72 is not a multiple of 16: Flux works on 16x16 pixel blocks",
            "node 2 (Sample) input 'negative_prompt': Flux takes no negative prompt",
            "node 2 (Sample) input 'scheduler': scheduler 'ddim' is for noise-prediction (UNet) models; Flux is a "
            "flow-matching model"]


def _problems(error: ValidationError) -> list[str]:
    return [line.strip() for line in str(error).splitlines()[1:]]


def test_flux_refusals_are_validation_errors_all_at_once_before_anything_runs(rt):
    events = []
    with pytest.raises(ValidationError) as info:
        rt.run(_workflow("tiny-flux", **REFUSED_ON_FLUX), on_event=events.append)
    problems = _problems(info.value)
    assert len(problems) == 3 and all(any(p.startswith(want) for p in problems) for want in REFUSALS), problems
    assert "Fix: leave negative_prompt empty" in str(info.value) and "Fix: use 64 or 80" in str(info.value)
    errors = info.value.node_errors["2"]["errors"]
    fields = {e["extra_info"]["input_name"]: e["extra_info"] for e in errors}
    assert fields["width"]["limit"] == "a multiple of 16" and fields["width"]["value"] == 72
    assert list(fields["scheduler"]["limit"]) == list(schedulers_for("flux"))
    assert not [e for e in events if e["event"] in ("executing", "executed")], "nothing ran"


def test_sd3_takes_a_negative_prompt_and_refuses_the_rest_at_validation(rt):
    with pytest.raises(ValidationError) as info:
        rt.validate(_workflow("tiny-sd3", **REFUSED_ON_FLUX))
    problems = _problems(info.value)
    assert len(problems) == 2 and not any("negative_prompt" in p for p in problems), problems


def test_the_base_architecture_is_known_through_model_nodes(rt):
    chain = [("Compile", {}), ("Fuse", {})]
    with pytest.raises(ValidationError, match="node 2 \\(Sample\\) input 'negative_prompt': Flux takes no"):
        rt.validate(_workflow("tiny-flux", chain, negative_prompt="blurry"))
    rt.validate(_workflow("tiny-sdxl", chain, negative_prompt="blurry", width=72))  # a UNet takes both


def test_the_architecture_of_a_folder_or_single_file_base_is_read_without_loading(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    from loraloom.bases.export import save_config_skeleton

    models = tmp_path / "models"
    save_config_skeleton(build_pipeline("tiny-flux", dtype="fp32", device="cpu"), models / "flux-configs")
    (models / "checkpoints").mkdir()
    save_file({"double_blocks.0.img_attn.qkv.weight": np.zeros((3, 1), np.float32)},
              str(models / "checkpoints" / "flux1.safetensors"))
    rt_files = Runtime(models_dir=models, output_dir=tmp_path / "out")
    for source, config in [("flux-configs", "auto"), ("checkpoints/flux1.safetensors", "flux-configs")]:
        with pytest.raises(ValidationError) as info:
            rt_files.validate(_workflow(source, config=config, **REFUSED_ON_FLUX))
        assert len(_problems(info.value)) == 3, (source, _problems(info.value))


def test_the_cli_validate_reports_every_flux_refusal(tmp_path, capsys):
    from loraloom.cli import EXIT_FAIL, main

    path = tmp_path / "flux.json"
    path.write_text(json.dumps(_workflow("tiny-flux", **REFUSED_ON_FLUX)))
    assert main(["validate", str(path)]) == EXIT_FAIL
    err = capsys.readouterr().err
    assert all(want in err for want in REFUSALS) and "Traceback" not in err, err
    assert main(["validate", str(path), "--json"]) == EXIT_FAIL
    body = json.loads(capsys.readouterr().out)
    inputs = [e["extra_info"]["input_name"] for e in body["node_errors"]["2"]["errors"]]
    assert sorted(inputs) == ["negative_prompt", "scheduler", "width"], body


@node(category="test", inputs=[Link("model", MODEL)], outputs=[Output(MODEL, "model")])
class OpaqueModelPass:
    """A third-party node that says nothing of its model: validation cannot know the architecture."""

    def execute(self, model):
        return (model,)


def test_where_validation_cannot_know_the_architecture_the_run_refuses(tmp_path):
    opaque = Runtime(models_dir=tmp_path / "models", output_dir=tmp_path / "out", nodes=[OpaqueModelPass])
    workflow = _workflow("tiny-flux", [("OpaqueModelPass", {})], negative_prompt="blurry")
    opaque.validate(workflow)
    with pytest.raises(ExecutionError, match="input 'negative_prompt': Flux takes no negative prompt.*Fix: leave "
                                             "negative_prompt empty"):
        opaque.run(workflow)


# What each flow scheduler is in diffusers' terms, written out here (not taken from the node) so a
# wrong override in the node shows as a different image.
_FLOW_SOLVER = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
BY_HAND = {"euler": ("FlowMatchEulerDiscreteScheduler", {}), "heun": ("FlowMatchHeunDiscreteScheduler", {}),
           "dpm++_2m": ("DPMSolverMultistepScheduler", _FLOW_SOLVER),
           "unipc": ("UniPCMultistepScheduler", _FLOW_SOLVER)}
OFFERED = [("tiny-flux", name) for name in ("euler", "dpm++_2m", "unipc")] + \
          [("tiny-sd3", name) for name in ("euler", "heun", "dpm++_2m", "unipc")]


def test_the_offered_flow_schedulers_are_these():
    assert sorted(schedulers_for("flux")) == sorted(["default"] + [n for p, n in OFFERED if p == "tiny-flux"])
    assert sorted(schedulers_for("sd3")) == sorted(["default"] + [n for p, n in OFFERED if p == "tiny-sd3"])


@pytest.mark.parametrize("preset, name", OFFERED)
def test_each_flow_scheduler_is_the_pipeline_called_with_it(rt, preset, name):
    call = {"guidance_scale": 3.5}
    ours = _run(rt, preset, scheduler=name)
    cls_name, overrides = BY_HAND[name]

    def swap(pipe):
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)

    want = _diffusers(preset, prepare=swap, **call)
    assert torch.equal(ours, want), f"{name}: differs from the pipeline by {(ours - want).abs().max():.2e}"
    if name != "euler":  # the base's own
        rt.cache.clear()
        assert not torch.equal(ours, _run(rt, preset)), f"{name} is not the default scheduler"


def _used_sigmas(pipe, scheduler):
    """The sigmas ``scheduler`` samples with in ``pipe`` at the test's size, and the arguments the
    pipeline gave its set_timesteps."""
    calls = []
    original = scheduler.set_timesteps

    @functools.wraps(original)  # the pipeline reads its signature (does it take sigmas?)
    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    scheduler.set_timesteps = recorded
    pipe.scheduler = scheduler
    pipe(prompt="a red circle", num_inference_steps=STEPS, width=SIZE, height=SIZE, output_type="latent",
         generator=torch.Generator("cpu").manual_seed(SEED))
    return scheduler.sigmas.clone(), calls[0]


@pytest.mark.parametrize("preset, name", OFFERED)
def test_each_flow_scheduler_samples_the_shifted_schedule(preset, name):
    arch = {"tiny-flux": "flux", "tiny-sd3": "sd3"}[preset]
    pipe = build_pipeline(preset, dtype="fp32", device="cpu")
    base = pipe.scheduler.config
    used, (args, kwargs) = _used_sigmas(pipe, make_scheduler(name, pipe.scheduler, arch))
    if arch == "flux":  # the resolution-dependent shift, from the latent tokens: (64 / 16) ** 2
        shift = math.exp(calculate_shift(16, base["base_image_seq_len"], base["max_image_seq_len"],
                                         base["base_shift"], base["max_shift"]))
        assert kwargs["mu"] == pytest.approx(math.log(shift)), "FluxPipeline passed this shift"
    else:  # SD3.5's static shift
        assert not base["use_dynamic_shifting"] and "mu" not in kwargs
        shift = base["shift"]
    # the same scheduler with that shift as a static one, and unshifted, called as the pipeline called it
    cls_name, overrides = BY_HAND[name]

    def static(value):
        fixed = getattr(diffusers, cls_name).from_config(
            base, **{**overrides, "use_dynamic_shifting": False, ("flow_shift" if overrides else "shift"): value})
        fixed.set_timesteps(*args, **{k: v for k, v in kwargs.items() if k != "mu"})
        return fixed.sigmas

    want = static(shift)
    assert shift > 1.2 and not torch.allclose(static(1.0), want, atol=1e-3), "the shift moves the schedule"
    torch.testing.assert_close(used, want, atol=1e-6, rtol=0, msg=f"{name}: not the shifted schedule")


def test_heun_is_not_offered_on_flux(rt):
    with pytest.raises(ValidationError, match="input 'scheduler': scheduler 'heun' cannot take Flux's "
                                              "resolution-dependent shift and samples with: default, euler, "
                                              "dpm\\+\\+_2m, unipc"):
        _run(rt, "tiny-flux", scheduler="heun")


def test_a_flow_scheduler_that_would_miss_the_base_shift_is_refused():
    schnell_like = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    with pytest.raises(InputError, match="'dpm\\+\\+_2m' does not fit this Flux base.*Fix: choose one of: "
                                         "default, euler, unipc"):
        make_scheduler("dpm++_2m", schnell_like, "flux")
    assert make_scheduler("unipc", schnell_like, "flux").config.flow_shift == 1.0, "unipc keeps the static shift"
    dynamic = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    with pytest.raises(InputError, match="'heun' does not fit this SD3.5 base: it cannot take the "
                                         "resolution-dependent shift"):
        make_scheduler("heun", dynamic, "sd3")
