"""WeightedBlend through real graphs, against diffusers' own set_adapters; block weights; what a
weight or prompt edit re-runs; the errors that name the node."""

import pytest
import torch

from loraloom.graph_runtime import ExecutionError, ValidationError


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_blend_matches_set_adapters(runtime, preset, blend_workflow, reference_image):
    names = runtime.names
    result = runtime.run(blend_workflow(names, preset))
    ours = result.value("5")
    ref = reference_image(runtime, preset, [names[f"{preset}/diffusers"], names[f"{preset}/diffusers-nometa"]], (0.7, 0.8))
    plain = runtime.run(blend_workflow(names, preset, w=(0.0, 0.0))).value("5")
    assert (ours - plain).abs().max() > 0.05, "the LoRAs must visibly change the image"
    assert torch.allclose(ours, ref, atol=2e-4), f"blend differs from set_adapters by {(ours - ref).abs().max():.2e}"


def test_second_branch_from_same_base_samples_plain_base(runtime, blend_workflow, sample_inputs):
    from loraloom.bases.presets import build_pipeline

    wf = blend_workflow(runtime.names)
    wf["10"] = {"class_type": "Sample", "inputs": sample_inputs(["1", 0])}
    wf["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}
    first = runtime.run(wf)
    again = runtime.run(wf, overrides={"10.seed": 4, "5.seed": 4})  # both re-run, in either order
    pipe = build_pipeline("tiny-sdxl", dtype="fp32", device="cpu")
    sample = wf["10"]["inputs"]
    for result, seed in ((first, 3), (again, 4)):
        out = pipe(prompt="a cat", num_inference_steps=sample["steps"], width=sample["width"], height=sample["height"],
                   guidance_scale=5.0,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images.permute(0, 2, 3, 1)
        assert torch.equal(result.value("10"), out), "the plain branch must sample the untouched base exactly"


def test_caching_through_real_nodes(runtime, loras_dir, blend_workflow):
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


def test_lora_for_wrong_base_is_refused_by_name(runtime, blend_workflow):
    wf = blend_workflow(runtime.names, preset="tiny-sd15")
    wf["2"]["inputs"]["lora_name"] = runtime.names["tiny-sdxl/diffusers"]
    with pytest.raises(ExecutionError) as info:
        runtime.run(wf)
    err = info.value
    assert (err.node_id, err.class_type) == ("4", "WeightedBlend")
    assert "SDXL" in str(err) and "tiny-sdxl-diffusers" in str(err), str(err)


@pytest.mark.parametrize("override,fragment", [
    ({"2.lora_name": "missing.safetensors"}, "node 2 (LoadLoRA) input 'lora_name': 'missing.safetensors' is not one of"),
    ({"2.lora_name": "../escape.safetensors"},
     "node 2 (LoadLoRA) input 'lora_name': lora name '../escape.safetensors' contains a '..' part"),
    ({"4.weight": 12.0}, "node 4 (WeightedBlend) input 'weight': 12.0 is above max 10.0"),
    ({"5.width": 100}, "node 5 (Sample) input 'width': 100 is not a multiple of 8"),
])
def test_bad_input_is_named(runtime, override, fragment, blend_workflow):
    with pytest.raises(ValidationError) as info:
        runtime.run(blend_workflow(runtime.names), overrides=override)
    assert fragment in str(info.value), str(info.value)


def test_block_weights_reach_resnets_and_convs(runtime, blend):
    locon = runtime.names["tiny-sdxl/locon"]
    result = runtime.run(blend(locon, blocks='{"unet": {"down": 0, "mid": 0, "up": 0}}'))
    recipe = result.value("4")
    scales = recipe.adapters[0].module_scales["unet"]
    resnets = [p for p in scales if ".resnets." in p]
    assert resnets and all(scales[p] == 0.0 for p in resnets), "resnet (LoCon) layers follow their block's weight"
    unet_off = runtime.run(blend(locon, weight=0.0)).value("5")
    assert torch.allclose(result.value("5"), unet_off, atol=1e-6), \
        "zero on every block must equal a zero UNet weight (diffusers' own dict leaves resnets at 1.0)"


def test_block_weight_errors_name_the_node(runtime, blend):
    with pytest.raises(ExecutionError) as info:
        runtime.run(blend(runtime.names["tiny-sdxl/kohya"], blocks="1,0,1"))
    assert "node 4 (WeightedBlend)" in str(info.value) and "3" in str(info.value), str(info.value)


def _blend_chain(lora_name, n, weight):
    """LoadBase (1), LoadLoRA (2), ``n`` chained WeightedBlend nodes (10...), Sample (5), PreviewImage (6)."""
    wf = {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "dtype": "fp32", "device": "cpu"}},
          "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora_name}}}
    prev = "1"
    for i in range(n):
        wf[str(10 + i)] = {"class_type": "WeightedBlend", "inputs": {
            "model": [prev, 0], "lora": ["2", 0], "weight": weight, "text_encoder_weight": weight,
            "block_weights": ""}}
        prev = str(10 + i)
    wf["5"] = {"class_type": "Sample", "inputs": {"model": [prev, 0], "prompt": "a cat", "steps": 1,
                                                  "width": 64, "height": 64, "seed": 3}}
    wf["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}
    return wf


def test_long_blend_chain_does_linear_work(runtime):
    """A 2,000-node chain (it took minutes when each node re-did work for every earlier one): the pool
    computes each LoRA layer's delta once, not once per application, every node's text stays short,
    and the image is the one a single blend of the summed weight gives."""
    from loraloom.bases.pool import pool_from

    n, w = 2000, 0.0005
    name = runtime.names["tiny-sd15/diffusers"]
    texts = []
    runtime.add_listener(lambda e: texts.append(e["output"]["text"][0])
                         if e["event"] == "executed" and e["class_type"] == "WeightedBlend" else None)
    chained = runtime.run(_blend_chain(name, n, w))
    pool = pool_from(runtime.resources)
    modules = sum(1 for _ in chained.value("2").modules())
    assert pool.stats["deltas"] == modules, f"{pool.stats['deltas']} deltas for a LoRA of {modules} modules"
    assert len(texts) == n and max(map(len, texts)) < 1000, "each node's text is bounded, not the whole chain"
    assert f"({n - 15} more)" in texts[-1], texts[-1]
    single = runtime.run(_blend_chain(name, 1, n * w)).value("5")
    plain = runtime.run(_blend_chain(name, 1, 0.0)).value("5")
    assert (single - plain).abs().max() > 0.01, "the summed weight must visibly change the image"
    assert torch.allclose(chained.value("5"), single, atol=1e-4), \
        f"chain differs from one blend by {(chained.value('5') - single).abs().max():.2e}"


def test_every_block_weight_example_in_the_tooltip_is_accepted_where_it_says():
    """The tooltip is what an editor user copies from: each example must parse for the architecture
    it names (an SD1.5 preset on SDXL, or a bare {"down": ...} dict, is refused)."""
    import re

    from loraloom.lora.blocks import parse_block_weights
    from loraloom.nodes.blend import WeightedBlend

    tooltip = next(i.tooltip for i in WeightedBlend.SCHEMA.widgets if i.name == "block_weights")
    examples = re.findall(r"([\d,]{20,}|[\w-]*(?:ALL|FRONT)) on (SD1\.5|SDXL|Flux|SD3\.5)", tooltip) + \
        [(dict_, "SDXL") for dict_ in re.findall(r"\((\{.*?\}\})", tooltip)] + \
        [(dict_, "Flux") for dict_ in re.findall(r"on a DiT (\{.*?\}\})", tooltip)]
    assert len(examples) >= 7, f"the examples were not found in {tooltip!r}: {examples}"
    arches = {"SD1.5": "sd15", "SDXL": "sdxl", "Flux": "flux", "SD3.5": "sd3"}
    for text, arch in examples:
        parse_block_weights(text, arches[arch])  # raises BlockWeightError if refused
