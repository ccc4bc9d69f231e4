"""PeftMerge against peft's own add_weighted_adapter on the tiny base; DARE's seed; rank checks; the
merge report in the UI and in the saved file."""

import copy
import json

import pytest
import torch

from loraloom.graph_runtime import ExecutionError, ValidationError

DEMO = ("demo-a.safetensors", "demo-b.safetensors")


def merge_workflow(method, weights=(1.0, 0.6), density=0.5, names=DEMO, extra=None):
    wf = {
        "1": {"class_type": "LoadLoRA", "inputs": {"lora_name": names[0]}},
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": names[1]}},
        "3": {"class_type": "PeftMerge", "inputs": {"lora_a": ["1", 0], "weight_a": weights[0], "lora_b": ["2", 0],
                                                    "weight_b": weights[1], "method": method, "density": density,
                                                    "seed": 5}},
        "4": {"class_type": "SaveLoRA", "inputs": {"lora": ["3", 0], "filename_prefix": "merged", "format": "kohya",
                                                   "dtype": "fp32"}},
    }
    wf.update(extra or {})
    return wf


def peft_reference(loras, weights, method, density=0.5):
    """The guide's flow: the tiny UNet as a PeftModel with both LoRAs as adapters, then peft's own
    add_weighted_adapter. Returns {module path: merged delta}."""
    from peft import LoraConfig, get_peft_model

    from loraloom.bases.presets import build_pipeline

    unet = copy.deepcopy(build_pipeline("tiny-sdxl", dtype="fp32", device="cpu").unet)
    model = None
    for name, lora in zip("ab", loras):
        mods = lora.components["unet"]
        config = LoraConfig(r=8, lora_alpha=8, target_modules=sorted(mods),
                            alpha_pattern={p: m.alpha for p, m in mods.items()})
        if model is None:
            model = get_peft_model(unet, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        for path, m in mods.items():
            layer = model.base_model.model.get_submodule(path)
            layer.lora_A[name].weight.data.copy_(m.down)
            layer.lora_B[name].weight.data.copy_(m.up)
    model.add_weighted_adapter(["a", "b"], list(weights), "m", combination_type=method, density=density)
    out = {}
    for path in loras[0].components["unet"]:
        layer = model.base_model.model.get_submodule(path)
        out[path] = (layer.lora_B["m"].weight @ layer.lora_A["m"].weight) * layer.scaling["m"]
    return out


@pytest.mark.parametrize("method", ["cat", "svd", "linear", "ties", "magnitude_prune", "ties_svd"])
def test_merge_node_matches_peft_add_weighted_adapter(runtime, method):
    result = runtime.run(merge_workflow(method))
    merged = result.value("3")
    ref = peft_reference([result.value("1"), result.value("2")], (1.0, 0.6), method)
    worst = 0.0
    for path, expected in ref.items():
        m = merged.components["unet"][path]
        ours = m.up @ m.down * (m.alpha / m.rank)
        worst = max(worst, ((ours - expected).norm() / expected.norm().clamp_min(1e-12)).item())
    assert worst < 1e-3, f"{method}: worst relative difference from peft per module {worst:.2e}"
    assert all(m.down.dtype == torch.float32 for _, _, m in merged.modules()), "merged factors stay fp32"


def test_merge_node_inputs_come_from_the_declarations():
    from loraloom.lora.merge_methods import PEFT_METHODS, REGISTRY
    from loraloom.nodes.merge import PeftMerge

    schema = PeftMerge.SCHEMA
    # Saved UI workflows store widget values by position: the original ones keep theirs, new options follow.
    assert [w.name for w in schema.widgets] == ["weight_a", "weight_b", "method", "density", "majority_sign_method",
                                                "svd_rank", "svd_clamp", "seed", "weight_c", "weight_d", "gamma"]
    method = schema.input("method")
    assert method.options == tuple(REGISTRY) and method.options[:11] == PEFT_METHODS, method.options
    assert "breadcrumbs_svd: Model Breadcrumbs," in method.tooltip and "(not in peft)" in method.tooltip
    gamma = schema.input("gamma")
    assert gamma.optional and gamma.default == 0.01 and gamma.tooltip.endswith("Used by breadcrumbs_svd"), gamma
    assert schema.input("svd_rank").tooltip.startswith("rank of the result; 0: the largest source rank")
    assert schema.input("seed").control_after_generate == "fixed", "a merge seed stays as set"


@pytest.mark.parametrize("method, override, fragment", [
    ("ties", {"3.density": 0.0}, "input 'density': ties: density 0.0 is outside (0, 1]. Fix: density is the "
                                  "fraction kept"),
    ("breadcrumbs_svd", {"3.density": 0.0}, "input 'density': breadcrumbs_svd: density 0.0 is outside (0, 1]"),
])
def test_merge_node_checks_the_options_its_method_reads(runtime, method, override, fragment):
    with pytest.raises(ValidationError) as info:
        runtime.run(merge_workflow(method), overrides=override)
    assert "node 3 (PeftMerge)" in str(info.value) and fragment in str(info.value), str(info.value)


def test_merge_node_breadcrumbs_svd(runtime):
    wf = merge_workflow("breadcrumbs_svd", density=0.4)
    wf["3"]["inputs"]["gamma"] = 0.05
    merged = runtime.run(wf).value("3")
    assert merged.metadata["loraloom.merge_method"] == "breadcrumbs_svd"
    params = json.loads(merged.metadata["loraloom.merge_parameters"])
    assert params["gamma"] == 0.05 and params["density"] == 0.4, params
    no_outliers = runtime.run(wf, overrides={"3.gamma": 0.0}).value("3")
    pruned = runtime.run(merge_workflow("magnitude_prune_svd", density=0.4)).value("3")
    assert "gamma" not in json.loads(pruned.metadata["loraloom.merge_parameters"]), "only its users record gamma"
    for c, p, m in pruned.modules():
        assert torch.equal(no_outliers.components[c][p].up, m.up), f"{c}.{p}: gamma 0 is magnitude_prune_svd"
    assert any(not torch.equal(merged.components[c][p].up, m.up) for c, p, m in pruned.modules()), \
        "dropping outliers changes the merge"


def test_dare_is_reproducible_whatever_ran_before(runtime):
    first = runtime.run(merge_workflow("dare_linear")).value("3")
    runtime.cache.clear()
    torch.manual_seed(1234)
    torch.rand(1000)
    second = runtime.run(merge_workflow("dare_linear")).value("3")
    for c, p, m in first.modules():
        assert torch.equal(m.up, second.components[c][p].up), f"{c}.{p}: DARE must not depend on the global RNG"
    other = runtime.run(merge_workflow("dare_linear"), overrides={"3.seed": 6}).value("3")
    assert any(not torch.equal(m.up, other.components[c][p].up) for c, p, m in first.modules()), \
        "another seed prunes differently"


def test_rank_mismatch_refused_naming_ranks_and_methods(runtime):
    names = (runtime.names["tiny-sdxl/kohya"], DEMO[0])
    with pytest.raises(ExecutionError) as info:
        runtime.run(merge_workflow("dare_linear", names=names))
    text = str(info.value)
    assert "node 3 (PeftMerge)" in text and "rank" in text and "cat" in text and "svd" in text, text
    cat = runtime.run(merge_workflow("cat", names=names)).value("3")
    assert cat.n_modules > 0, "cat accepts different ranks"


def test_report_in_ui_and_saved_file(runtime, tmp_path):
    from loraloom.lora.readers import read_lora

    result = runtime.run(merge_workflow("svd"))
    summary = result.value("3").notes[0]
    assert "relative error" in summary and "energy kept" in summary, summary
    ref = result.outputs["4"]["loras"][0]
    saved = read_lora(tmp_path / "out" / ref["subfolder"] / ref["filename"])
    report = json.loads(saved.metadata["loraloom.merge_report"])
    assert set(report) == {"unet", "text_encoder", "text_encoder_2"}
    assert 0.0 <= report["unet"]["rel_error"] < 1.0 and 0.0 < report["unet"]["energy_kept"] <= 1.0
    assert saved.metadata["loraloom.merge_method"] == "svd"
    for c, p, m in result.value("3").modules():
        assert torch.equal(saved.components[c][p].up, m.up), "an fp32 kohya save round-trips exactly"
