"""Sample: every scheduler deterministic, step minimums, batch and seed, an interrupted sample."""

import pytest
import torch

from loraloom.api import Runtime
from loraloom.graph_runtime import Interrupted, Limits, ValidationError
from loraloom.nodes.sample import SCHEDULERS


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_samples_deterministically(runtime, scheduler, sample_wf):
    first = runtime.run(sample_wf(scheduler=scheduler, steps=4)).value("2")
    runtime.cache.clear()
    second = runtime.run(sample_wf(scheduler=scheduler, steps=4)).value("2")
    assert torch.isfinite(first).all() and first.shape == (1, 64, 64, 3)
    assert torch.equal(first, second), f"{scheduler}: same inputs must give the same image"


def test_pndm_step_minimum_is_a_validation_error(runtime, sample_wf):
    with pytest.raises(ValidationError, match="node 2 \\(Sample\\) input 'steps': 2 is below 4"):
        runtime.run(sample_wf(scheduler="pndm", steps=2))


def _problems(info) -> list[str]:
    return [line.strip() for line in str(info.value).splitlines()[1:]]


def test_every_size_problem_is_reported_at_once(runtime, sample_wf):
    with pytest.raises(ValidationError) as info:
        runtime.validate(sample_wf(width=130, height=9999, scheduler="pndm", steps=2))
    assert _problems(info) == ["node 2 (Sample) input 'height': 9999 is above max 8192",
                               "node 2 (Sample) input 'width': 130 is not a multiple of 8 (the VAE works on 8x8 "
                               "pixel blocks)",
                               "node 2 (Sample) input 'steps': 2 is below 4, the fewest steps the pndm scheduler "
                               "can take"], "a range error must not hide the node's own rules"


def test_the_pixel_limit_shows_beside_a_size_that_is_no_multiple_of_8(runtime, sample_wf):
    small = Runtime(folders=runtime.folders, limits=Limits(max_pixels=64 * 64))
    with pytest.raises(ValidationError) as info:
        small.validate(sample_wf(width=130, height=64))
    first, second = _problems(info)
    assert first.startswith("node 2 (Sample) input 'width': 130 is not a multiple of 8"), first
    assert second.startswith("node 2 (Sample): width x height x batch_size = 130 x 64 x 1 = 8320 pixels is above "
                             "the limit 4096."), second


@pytest.mark.parametrize("node_id, inputs, kind", [
    # LoadBase: a checkpoint needs a config folder (not 'auto'), this one is refused as not in the list
    ("1", {"source": "checkpoints/base.safetensors", "config": "no-such-folder"}, "value_not_in_list"),
    ("3", {"filename_prefix": "x\ud800"}, "invalid_text"),  # SaveImage: the prefix must stay in the output folder
    ("3", {"filename_prefix": "x" * 30_000}, "value_too_long"),
])
def test_a_refused_value_is_not_judged_again_by_the_node_rules(runtime, sample_wf, node_id, inputs, kind):
    (runtime.folders.models_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (runtime.folders.models_dir / "checkpoints" / "base.safetensors").write_bytes(b"")  # listed, never opened here
    wf = sample_wf()
    wf["3"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ok"}}
    wf[node_id]["inputs"].update(inputs)
    with pytest.raises(ValidationError) as info:
        runtime.validate(wf)
    assert [e["type"] for e in info.value.node_errors[node_id]["errors"]] == [kind], str(info.value)


def test_batch_and_seed(runtime, sample_wf):
    two = runtime.run(sample_wf(batch_size=2)).value("2")
    assert two.shape[0] == 2 and not torch.equal(two[0], two[1]), "a batch holds different images"
    other = runtime.run(sample_wf(seed=8)).value("2")
    assert not torch.equal(other, runtime.run(sample_wf()).value("2")), "another seed, another image"


def test_interrupted_sample_writes_no_file(runtime, tmp_path, blend_workflow):
    wf = blend_workflow(runtime.names)
    wf["5"]["inputs"]["steps"] = 50
    wf["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "x"}}

    def on_event(event):
        if event["event"] == "progress" and event["value"] == 2:
            runtime.interrupt()

    with pytest.raises(Interrupted):
        runtime.run(wf, on_event=on_event)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.rglob("*")), f"nothing may be written: {list(out.rglob('*'))}"
    result = runtime.run(wf, overrides={"5.steps": 2})
    assert result.outputs["6"]["images"][0]["filename"] == "x_00001_.png", "the next run works"
