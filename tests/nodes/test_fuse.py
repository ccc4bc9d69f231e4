"""Fuse through real graphs, against diffusers' own fuse_lora; a partial fuse and Sample's lora_scale;
Fuse leaves the recipe it was given unchanged."""

import pytest
import torch


def test_fuse_matches_fuse_lora_and_blend(runtime, blend_workflow, with_fused_branch, reference_image):
    names = runtime.names
    wf = with_fused_branch(blend_workflow(names))
    result = runtime.run(wf)
    ref = reference_image(runtime, "tiny-sdxl", [names["tiny-sdxl/diffusers"], names["tiny-sdxl/diffusers-nometa"]],
                          (0.7, 0.8), fuse=True)
    fused, blended = result.value("8"), result.value("5")
    assert torch.allclose(fused, ref, atol=2e-4), f"fused differs from fuse_lora by {(fused - ref).abs().max():.2e}"
    assert torch.allclose(fused, blended, atol=1e-5), "fusing must not change what the blend samples"


def test_sample_time_lora_scale_leaves_fused_loras_alone(runtime, blend_workflow, with_fused_branch):
    names = runtime.names
    wf = with_fused_branch(blend_workflow(names), adapter_names=names["tiny-sdxl/diffusers"].rsplit(".", 1)[0],
                           lora_scale=0.0)
    only_a = blend_workflow(names, w=(0.7, 0.0))
    result = runtime.run(wf)
    ref = runtime.run(only_a).value("5")
    assert torch.allclose(result.value("8"), ref, atol=1e-5), \
        "lora_scale=0 at sampling must drop the unfused LoRA and keep the fused one (diffusers' trap avoided)"


def test_inputs_are_not_mutated(runtime, blend_workflow, with_fused_branch):
    names = runtime.names
    wf = with_fused_branch(blend_workflow(names), fuse_scale=0.5)
    result = runtime.run(wf)
    base, lora, blended = result.value("1"), result.value("2"), result.value("4")
    assert base.fused == () and base.adapters == (), "LoadBase's recipe must stay the plain base"
    assert len(blended.adapters) == 2 and blended.fused == (), "Fuse must not change the blend it was given"
    assert [a.weight for a in blended.adapters] == [0.7, 0.8], "Fuse's lora_scale must not rescale its input"
    before = {(c, p): m.up.clone() for c, p, m in lora.modules()}
    runtime.run(wf, overrides={"4.weight": 0.3})
    assert all(torch.equal(m.up, before[c, p]) for c, p, m in lora.modules()), "LoRA tensors must not change"


def test_unknown_adapter_names_fail_with_fields(runtime, blend_workflow, with_fused_branch):
    from loraloom import ExecutionError

    names = runtime.names
    wf = with_fused_branch(blend_workflow(names), adapter_names="nope")
    with pytest.raises(ExecutionError) as info:
        runtime.run(wf)
    err = info.value
    active = [names["tiny-sdxl/diffusers"].rsplit(".", 1)[0], names["tiny-sdxl/diffusers-nometa"].rsplit(".", 1)[0]]
    assert (err.node, err.class_type, err.input, err.kind) == ("7", "Fuse", "adapter_names", "unknown_adapter")
    assert (err.value, err.limit) == (["nope"], active), "what was asked for, and the names there are"
    assert err.exception_type == "loraloom.InputError" and str(err).endswith(f"Fix: {err.fix}"), str(err)
