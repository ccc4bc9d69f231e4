"""WeightedBlend, Fuse and Sample through real graphs, against diffusers' own set_adapters/fuse_lora."""

import pytest
import torch

from loraloom.graph_runtime import ExecutionError, Interrupted, ValidationError

SIZE, STEPS = 64, 3


def sample_inputs(model_link, **kw):
    inputs = {"model": model_link, "prompt": "a cat", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 3,
              "guidance": 5.0}
    inputs.update(kw)
    return inputs


def blend_workflow(names, preset="tiny-sdxl", w=(0.7, 0.8), te=None, blocks=""):
    a, b = names[f"{preset}/diffusers"], names[f"{preset}/diffusers-nometa"]
    return {
        "1": {"class_type": "LoadBase", "inputs": {"source": preset, "dtype": "fp32", "device": "cpu"}},
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": a}},
        "3": {"class_type": "LoadLoRA", "inputs": {"lora_name": b}},
        "4": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": w[0],
                                                        "text_encoder_weight": w[0] if te is None else te,
                                                        "block_weights": blocks, "lora_2": ["3", 0],
                                                        "weight_2": w[1]}},
        "5": {"class_type": "Sample", "inputs": sample_inputs(["4", 0])},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def with_fused_branch(wf, fuse_scale=1.0, adapter_names="", **sample):
    """Add Fuse (7) on the blend, Sample (8, ``sample`` overrides its inputs) and PreviewImage (9)."""
    wf["7"] = {"class_type": "Fuse", "inputs": {"model": ["4", 0], "lora_scale": fuse_scale,
                                                "adapter_names": adapter_names}}
    wf["8"] = {"class_type": "Sample", "inputs": sample_inputs(["7", 0], **sample)}
    wf["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    return wf


def reference_image(runtime, preset, files, weights, fuse=False):
    """The same LoRAs through diffusers' own load_lora_weights + set_adapters (+ fuse_lora)."""
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


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_blend_matches_set_adapters(runtime, preset):
    names = runtime.names
    result = runtime.run(blend_workflow(names, preset))
    ours = result.value("5")
    ref = reference_image(runtime, preset, [names[f"{preset}/diffusers"], names[f"{preset}/diffusers-nometa"]], (0.7, 0.8))
    plain = runtime.run(blend_workflow(names, preset, w=(0.0, 0.0))).value("5")
    assert (ours - plain).abs().max() > 0.05, "the LoRAs must visibly change the image"
    assert torch.allclose(ours, ref, atol=2e-4), f"blend differs from set_adapters by {(ours - ref).abs().max():.2e}"


def test_fuse_matches_fuse_lora_and_blend(runtime):
    names = runtime.names
    wf = with_fused_branch(blend_workflow(names))
    result = runtime.run(wf)
    ref = reference_image(runtime, "tiny-sdxl", [names["tiny-sdxl/diffusers"], names["tiny-sdxl/diffusers-nometa"]],
                          (0.7, 0.8), fuse=True)
    fused, blended = result.value("8"), result.value("5")
    assert torch.allclose(fused, ref, atol=2e-4), f"fused differs from fuse_lora by {(fused - ref).abs().max():.2e}"
    assert torch.allclose(fused, blended, atol=1e-5), "fusing must not change what the blend samples"


def test_sample_time_lora_scale_leaves_fused_loras_alone(runtime):
    names = runtime.names
    wf = with_fused_branch(blend_workflow(names), adapter_names=names["tiny-sdxl/diffusers"].rsplit(".", 1)[0],
                           lora_scale=0.0)
    only_a = blend_workflow(names, w=(0.7, 0.0))
    result = runtime.run(wf)
    ref = runtime.run(only_a).value("5")
    assert torch.allclose(result.value("8"), ref, atol=1e-5), \
        "lora_scale=0 at sampling must drop the unfused LoRA and keep the fused one (diffusers' trap avoided)"


def test_second_branch_from_same_base_samples_plain_base(runtime):
    from loraloom.bases.presets import build_pipeline

    wf = blend_workflow(runtime.names)
    wf["10"] = {"class_type": "Sample", "inputs": sample_inputs(["1", 0])}
    wf["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}
    first = runtime.run(wf)
    again = runtime.run(wf, overrides={"10.seed": 4, "5.seed": 4})  # both re-run, in either order
    pipe = build_pipeline("tiny-sdxl", dtype="fp32", device="cpu")
    for result, seed in ((first, 3), (again, 4)):
        out = pipe(prompt="a cat", num_inference_steps=STEPS, width=SIZE, height=SIZE, guidance_scale=5.0,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images.permute(0, 2, 3, 1)
        assert torch.equal(result.value("10"), out), "the plain branch must sample the untouched base exactly"


def test_inputs_are_not_mutated(runtime):
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


def test_caching_through_real_nodes(runtime, loras_dir):
    import os

    wf = blend_workflow(runtime.names)
    runtime.run(wf)
    prompt = runtime.run(wf, overrides={"5.prompt": "a dog"})
    assert sorted(prompt.executed) == ["5", "6"], "a prompt edit re-runs only Sample and the save node"
    weight = runtime.run(wf, overrides={"4.weight": 0.2})
    assert sorted(weight.executed) == ["4", "5", "6"], "a weight edit reads no LoRA file and loads no base"
    root, names = loras_dir
    path = root / names["tiny-sdxl/diffusers-nometa"]
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))
    same = runtime.run(wf, overrides={"4.weight": 0.2})
    assert same.executed == [], "same bytes, new mtime: the content fingerprint is unchanged"


def test_lora_for_wrong_base_is_refused_by_name(runtime):
    wf = blend_workflow(runtime.names, preset="tiny-sd15")
    wf["2"]["inputs"]["lora_name"] = runtime.names["tiny-sdxl/diffusers"]
    with pytest.raises(ExecutionError) as info:
        runtime.run(wf)
    err = info.value
    assert (err.node_id, err.class_type) == ("4", "WeightedBlend")
    assert "SDXL" in str(err) and "tiny-sdxl-diffusers" in str(err), str(err)


@pytest.mark.parametrize("override,fragment", [
    ({"2.lora_name": "missing.safetensors"}, "node 2 (LoadLoRA) input 'lora_name': 'missing.safetensors' is not one of"),
    ({"2.lora_name": "../escape.safetensors"}, "node 2 (LoadLoRA) input 'lora_name': '../escape.safetensors' is not"),
    ({"4.weight": 9.0}, "node 4 (WeightedBlend) input 'weight': 9.0 is above max 4.0"),
    ({"5.width": 100}, "node 5 (Sample) input 'width': 100 is not a multiple of 8"),
])
def test_bad_input_is_named(runtime, override, fragment):
    with pytest.raises(ValidationError) as info:
        runtime.run(blend_workflow(runtime.names), overrides=override)
    assert fragment in str(info.value), str(info.value)


def test_interrupted_sample_writes_no_file(runtime, tmp_path):
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
