"""Sample: every scheduler deterministic, step minimums, batch and seed, an interrupted sample."""

import pytest
import torch

from loraloom.graph_runtime import Interrupted, ValidationError
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
