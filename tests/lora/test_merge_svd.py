"""lora/merge_svd.py: the SVD solvers behind ``svd`` and the pruning ``*_svd`` forms, and peft's clamp."""
from __future__ import annotations

import pytest
import torch

from loraloom.lora import merge_ops
from loraloom.lora.merge_svd import SvdMerge, clamp, full_delta_svd, stacked_svd, top_svd


def test_top_svd_agrees_with_dense_svd():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(600, 64, generator=g) @ torch.randn(64, 500, generator=g)
    D = merge_ops.magnitude_prune(low, 0.5, select="kth")
    U, S, Vh, solver = top_svd(D, 32, 80)
    Ue, Se, Vhe = torch.linalg.svd(D, full_matrices=False)
    want = (Ue[:, :32] * Se[:32]) @ Vhe[:32]
    diff = float(((U * S) @ Vh - want).norm() / want.norm())
    assert solver == "subspace-iteration" and diff < 1e-4, f"{solver}: {diff:.2e} from the dense SVD"


def _factors(seed: int, rank: int, out: int = 30, inp: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def test_stacked_rank_is_capped_at_the_sum_of_source_ranks():
    (a1, b1), (a2, b2) = _factors(0, 2), _factors(1, 3)
    merged = stacked_svd([a1, a2], [b1, b2], [0.5, -2.0], rank=16)
    want = 0.5 * b1 @ a1 - 2.0 * b2 @ a2
    assert merged.down.shape == (5, 20) and merged.up.shape == (30, 5), "rank min(16, 2 + 3) = 5"
    torch.testing.assert_close(merged.up @ merged.down, want, atol=1e-5, rtol=1e-5)
    assert merged.kept_energy == pytest.approx(merged.total_energy) == pytest.approx(float(want.norm()) ** 2, rel=1e-5)
    assert merged.solver == "stacked-qr"


def test_full_delta_path_agrees_with_the_stacked_path():
    # Plain task arithmetic through the full-delta path must give the stacked path's rank-k product.
    (a1, b1), (a2, b2) = _factors(2, 4), _factors(3, 4)
    weights, scales = (1.0, 0.7), (0.25, 2.0)
    full = full_delta_svd(merge_ops.combine_linear, [a1, a2], [b1, b2], list(zip(weights, scales)), rank=3)
    stacked = stacked_svd([a1, a2], [b1, b2], [w * s for w, s in zip(weights, scales)], rank=3)
    torch.testing.assert_close(full.up @ full.down, stacked.up @ stacked.down, atol=1e-4, rtol=1e-4)
    dense = 0.25 * b1 @ a1 + 0.7 * 2.0 * b2 @ a2
    assert full.total_energy == pytest.approx(float(dense.norm()) ** 2, rel=1e-5), "total = ||D||^2 of the full delta"
    assert full.kept_energy == pytest.approx(stacked.kept_energy, rel=1e-4)


def test_clamp_hand_computed():
    # entries of up and down: 1, -3, 2, 0.5; the median of (-3, 0.5, 1, 2) is 0.75 (linear rule)
    merged = SvdMerge(torch.tensor([[2.0, 0.5]]), torch.tensor([[1.0], [-3.0]]), 9.0, 10.0, "stacked-qr")
    out = clamp(merged, 0.5)
    assert out.up.tolist() == [[0.75], [-0.75]] and out.down.tolist() == [[0.75, 0.5]], (out.up, out.down)
    assert (out.kept_energy, out.total_energy, out.solver) == (9.0, 10.0, "stacked-qr"), "the report is the SVD's"
