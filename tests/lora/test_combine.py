"""lora/combine.py (merge_lora_values, the PeftMerge node's work): LoRA values in, one portable LoRA
value out, with provenance. The merge maths itself is tested in test_merge*.py."""
from __future__ import annotations

import json

import pytest
import torch

from loraloom.lora.canonical import delta
from loraloom.lora.combine import merge_lora_values
from loraloom.lora.merge import MergeError
from loraloom.lora.readers import read_lora


@pytest.mark.parametrize("other", ["locon", "loha"])
def test_cat_is_the_exact_weighted_sum_over_every_module(other, lora_files):
    """cat is exact, so the merged delta of each module is w1 * delta1 + w2 * delta2 (a module one
    LoRA lacks counts as zero). With a LoHa: SD1.5's 1x1-conv proj_in is 2-D after conversion and
    4-D in the kohya file; the two still merge."""
    a, b = read_lora(lora_files["tiny-sd15/kohya"]), read_lora(lora_files[f"tiny-sd15/{other}"])
    merged, report = merge_lora_values([a, b], "cat", [1.0, -0.5])
    in_a = {(c, p): m for c, p, m in a.modules()}
    in_b = {(c, p): m for c, p, m in b.modules()}
    assert {(c, p) for c, p, _ in merged.modules()} == in_a.keys() | in_b.keys()
    for component, path, m in merged.modules():
        got = delta(m)
        want = torch.zeros_like(got)
        for source, weight in ((in_a, 1.0), (in_b, -0.5)):
            if (component, path) in source:
                want += weight * delta(source[(component, path)], tuple(got.shape)).float()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{component}.{path}")
        assert m.kind == "lora" and m.down.dtype == torch.float32 and m.alpha == m.rank, f"{component}.{path}"
    assert set(report.components) == {"unet", "text_encoder"}


def test_provenance_and_fingerprint(lora_files):
    a, b = read_lora(lora_files["tiny-sd15/kohya"]), read_lora(lora_files["tiny-sd15/locon"])
    merged, _ = merge_lora_values([a, b], "cat", [1.0, 0.5], names=["one", "two"])
    again, _ = merge_lora_values([a, b], "cat", [1.0, 0.5], names=["other", "names"])
    other, _ = merge_lora_values([a, b], "cat", [1.0, 0.25])
    assert merged.source_format == "derived" and merged.metadata["loraloom.merge_method"] == "cat"
    assert json.loads(merged.metadata["loraloom.merge_sources"]) == [
        {"name": "one", "fingerprint": a.fingerprint}, {"name": "two", "fingerprint": b.fingerprint}]
    assert json.loads(merged.metadata["loraloom.merge_parameters"])["weights"] == [1.0, 0.5]
    assert set(json.loads(merged.metadata["loraloom.merge_report"])) == {"unet", "text_encoder"}
    assert merged.fingerprint == again.fingerprint, "names are labels: the same merge has one fingerprint"
    assert merged.fingerprint != other.fingerprint, "other weights, other LoRA"
    assert merged.notes and merged.notes[0].startswith("merge cat:")


def test_loras_for_different_models_are_refused(lora_files):
    sd15, sdxl = read_lora(lora_files["tiny-sd15/kohya"]), read_lora(lora_files["tiny-sdxl/kohya"])
    with pytest.raises(MergeError, match="made for different models"):
        merge_lora_values([sd15, sdxl], "cat", [1.0, 1.0])
