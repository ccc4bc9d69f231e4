"""Block weights on a DiT through a real graph: WeightedBlend on tiny-flux (real 19 + 38 block
layout) with lora-block-weight strings, checked on the weights the pool patches into the
transformer, layer by layer, against base + coefficient * delta with the coefficient each
module's block should get."""
import pytest
import torch

from loraloom.api import Runtime
from loraloom.bases.pool import pool_from
from loraloom.graph_runtime import ExecutionError, Output, String, node
from loraloom.lora.canonical import delta
from loraloom.nodes.common import LORA

WEIGHT = 0.7
# base + 19 double + 38 single: doubles at 1, singles at 0, base (embedders, final layer) at 0.5
DOUBLES_ONLY = ",".join(["0.5"] + ["1"] * 19 + ["0"] * 38)


@node(category="test", inputs=[String("preset", "")], outputs=[Output(LORA, "lora")])
class BlockTestLoRA:
    """The test LoRA of a DiT preset (the dit_lora fixture), as LoadLoRA would output it."""

    values: dict = {}

    def execute(self, preset):
        return (self.values[preset],)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """A runtime that knows the BlockTestLoRA node."""
    root = tmp_path_factory.mktemp("dit-blocks")
    return Runtime(models_dir=root / "models", output_dir=root / "out", nodes=[BlockTestLoRA])


@pytest.fixture(scope="module")
def flux(runtime, dit_lora):
    """(runtime, LoRA value) for tiny-flux."""
    _, lora = dit_lora("tiny-flux")
    BlockTestLoRA.values["tiny-flux"] = lora
    return runtime, lora


def _blend(blocks: str, preset: str = "tiny-flux") -> dict:
    return {"1": {"class_type": "LoadBase", "inputs": {"source": preset, "dtype": "fp32", "device": "cpu"}},
            "2": {"class_type": "BlockTestLoRA", "inputs": {"preset": preset}},
            "4": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": WEIGHT,
                                                            "text_encoder_weight": 1.0, "block_weights": blocks}},
            # an output node, so the workflow validates; the tests run only up to the blend (outputs=["4"])
            "5": {"class_type": "Sample", "inputs": {"model": ["4", 0], "prompt": "a red circle", "steps": 1,
                                                     "width": 64, "height": 64, "seed": 1}},
            "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}


def _patched(rt, blocks: str, preset: str = "tiny-flux") -> dict[str, torch.Tensor]:
    """The transformer's weights as the pool patches them for the blend (a copy of each)."""
    recipe = rt.run(_blend(blocks, preset), outputs=["4"]).value("4")
    pipe = pool_from(rt.resources).pipeline(recipe)
    return {name: p.detach().clone() for name, p in pipe.transformer.named_parameters() if name.endswith("weight")}


def _coefficient(path: str) -> float:
    if path.startswith("transformer_blocks."):
        return WEIGHT * 1.0
    if path.startswith("single_transformer_blocks."):
        return 0.0
    return WEIGHT * 0.5  # outside the blocks: BASE


def test_zeroing_the_single_blocks_changes_exactly_the_double_blocks_and_base(flux):
    rt, lora = flux
    plain = _patched(rt, "FLUX-NONE")
    ours = _patched(rt, DOUBLES_ONLY)
    modules = lora.components["transformer"]
    families = {p.split(".")[0] for p in modules}
    assert {"transformer_blocks", "single_transformer_blocks", "proj_out"} <= families, \
        f"the test LoRA must reach double, single and base modules: {families}"
    for path, module in modules.items():
        key = f"{path}.weight"
        want = plain[key] + _coefficient(path) * delta(module, plain[key].shape)
        assert torch.allclose(ours[key], want, atol=1e-6), f"{path}: off by {(ours[key] - want).abs().max():.2e}"
    changed = {k.removesuffix(".weight") for k in ours if not torch.equal(ours[k], plain[k])}
    expected = {p for p in modules if _coefficient(p) != 0.0}
    assert changed == expected, f"changed but not expected {sorted(changed - expected)[:3]}, " \
                                f"expected but unchanged {sorted(expected - changed)[:3]}"
    assert any(p.startswith("single_transformer_blocks.") for p in modules) and \
        not any(p.startswith("single_transformer_blocks.") for p in changed), "no single block may change"


def test_all_equals_no_block_weights(flux):
    rt, _ = flux
    none = _patched(rt, "")
    for spec in ("FLUX-ALL", "FLUXALL", ",".join(["1"] * 58), '{"transformer": {"transformer_blocks": 1}}'):
        got = _patched(rt, spec)
        assert all(torch.equal(got[k], none[k]) for k in none), f"{spec} must equal no block weights"
    assert not all(torch.equal(_patched(rt, "FLUX-DBL-ALL")[k], none[k]) for k in none), "FLUX-DBL-ALL must differ"


def test_wrong_length_names_node_input_value_and_count(flux):
    rt, _ = flux
    with pytest.raises(ExecutionError) as info:
        rt.run(_blend(",".join(["1"] * 57)), outputs=["4"])
    err = info.value
    text = str(err)
    assert (err.node_id, err.class_type, err.input) == ("4", "WeightedBlend", "block_weights"), text
    assert "input 'block_weights'" in text and "57 values" in text and "58 = Inspire Pack layout" in text, text
    assert err.value == 57 and err.limit == (58, 61), (err.value, err.limit)


def test_sd3_tail_changes_exactly_the_second_half_of_the_joint_blocks(runtime, dit_lora):
    _, lora = dit_lora("tiny-sd3")
    BlockTestLoRA.values["tiny-sd3"] = lora
    plain = _patched(runtime, "SD3-NONE", "tiny-sd3")
    tail = _patched(runtime, "SD3-TAIL", "tiny-sd3")
    modules = lora.components["transformer"]
    for path, module in modules.items():
        key = f"{path}.weight"
        coefficient = WEIGHT if int(path.split(".")[1]) >= 19 else 0.0
        want = plain[key] + coefficient * delta(module, plain[key].shape)
        assert torch.allclose(tail[key], want, atol=1e-6), f"{path}: off by {(tail[key] - want).abs().max():.2e}"
    assert any(int(p.split(".")[1]) < 19 for p in modules) and any(int(p.split(".")[1]) >= 19 for p in modules)
