"""lora/merge_svd.py: the SVD solvers behind ``svd`` and the pruning ``*_svd`` forms, and peft's clamp."""
from __future__ import annotations

import math

import pytest
import torch

from loraloom.lora import merge_ops
from loraloom.lora import merge_svd
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


# ------------------------------------------------------------------ randomized SVD and its bound


def _with_spectrum(spectrum: list[float], m: int = 400, n: int = 300, seed: int = 0) -> torch.Tensor:
    """U diag(spectrum) V^T with random orthonormal U [m, r], V [n, r]: a matrix whose SVD is known."""
    g = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return (U * torch.tensor(spectrum, dtype=torch.float64)) @ V.T, U, V


def test_randomized_svd_recovers_a_known_spectrum():
    # 20 large singular values 10..5.25, a gap, then a decaying tail of 0.5..0.05: the best rank-8
    # approximation is U_8 S_8 V_8^T, written down from the construction.
    spectrum = [10 - 0.25 * i for i in range(20)] + [0.5 * 0.97 ** i for i in range(75)]
    D, U, V = _with_spectrum(spectrum)
    top = merge_svd.randomized_svd(D.float(), 8, 40)
    best = (U[:, :8] * torch.tensor(spectrum[:8], dtype=torch.float64)) @ V[:, :8].T
    got = (top.U.double() * top.S.double()) @ top.Vh.double()
    error = float((got - best).norm() / best.norm())
    assert top.solver == merge_svd.RANDOMIZED and top.products <= 9, f"{top.solver} after {top.products} products"
    assert error <= top.bound <= merge_svd.TOLERANCE, f"error {error:.2e}, bound {top.bound:.2e}"
    torch.testing.assert_close(top.S.double(), torch.tensor(spectrum[:8], dtype=torch.float64), rtol=1e-5, atol=0)


def test_randomized_svd_stops_on_either_side_of_a_power_iteration():
    # The bound is checked after every product, with D and with D^T: tolerances from loose to tight
    # stop after odd and even product counts; either way the triplets are D's own (shapes, the
    # product within its certified bound of the known best rank-8 approximation).
    spectrum = [10 - 0.25 * i for i in range(20)] + [3.0 * 0.97 ** i for i in range(75)]
    D, U, V = _with_spectrum(spectrum, m=500, n=260)
    best = (U[:, :8] * torch.tensor(spectrum[:8], dtype=torch.float64)) @ V[:, :8].T
    stops = set()
    for tolerance in (1e-2, 3e-3, 3e-4, 1e-4):
        top = merge_svd.randomized_svd(D.float(), 8, 40, tolerance=tolerance)
        assert top.solver == merge_svd.RANDOMIZED, f"tolerance {tolerance}: {top.solver}"
        assert (top.U.shape, top.Vh.shape) == ((500, 8), (8, 260)), f"{top.U.shape}, {top.Vh.shape}"
        error = float(((top.U.double() * top.S.double()) @ top.Vh.double() - best).norm() / best.norm())
        assert error <= top.bound <= tolerance, f"tolerance {tolerance}: error {error:.2e}, bound {top.bound:.2e}"
        stops.add(top.products % 2)
    assert stops == {0, 1}, f"every stop after the same parity of products: {stops}"


def test_randomized_svd_falls_back_where_singular_values_tie_at_k():
    # sigma_8 == sigma_9: the best rank-8 approximation is not unique, no bound can certify one, so
    # the exact thin SVD runs (and says so).
    spectrum = [10.0 - i for i in range(7)] + [2.0, 2.0, 2.0] + [0.1] * 40
    D, _, _ = _with_spectrum(spectrum)
    top = merge_svd.randomized_svd(D.float(), 8, 40)
    assert top.solver == merge_svd.FALLBACK and top.bound is None, f"{top.solver}, bound {top.bound}"
    torch.testing.assert_close(top.S.double(), torch.tensor(spectrum[:8], dtype=torch.float64), rtol=1e-5, atol=0)


def test_randomized_svd_is_deterministic_and_leaves_the_global_rng_alone():
    D, _, _ = _with_spectrum([5.0, 4.0, 3.0] + [0.3 * 0.9 ** i for i in range(60)])
    first = merge_svd.randomized_svd(D.float(), 3, 16)
    state = torch.get_rng_state()
    torch.rand(1000)  # whatever ran before must not matter
    second = merge_svd.randomized_svd(D.float(), 3, 16)
    assert torch.equal(first.U, second.U) and torch.equal(first.Vh, second.Vh) and first.bound == second.bound
    assert not torch.equal(torch.get_rng_state(), state), "sanity: the global RNG moved in between"
    before = torch.get_rng_state()
    merge_svd.randomized_svd(D.float(), 3, 16)
    assert torch.equal(torch.get_rng_state(), before), "randomized_svd drew from torch's global RNG"


def test_certified_bound_hand_computed():
    S = torch.tensor([4.0, 3.0, 1.0], dtype=torch.float64)
    # exact Ritz vectors (no residual): bound 0
    assert merge_svd.certified_bound(S, torch.zeros(3, dtype=torch.float64), 2, 0.5) == 0.0
    # ||F||_F = 0.01 (first two columns), no coupling; delta = 3 - max(1, sqrt(0^2 + 0.5^2)) = 2;
    # bound = 2 * 0.01 * sqrt(16 + 0.25) / (2 * 5) = 0.00806...
    residual = torch.tensor([0.0001 * 0.36, 0.0001 * 0.64, 0.0], dtype=torch.float64)
    assert merge_svd.certified_bound(S, residual, 2, 0.5) == pytest.approx(2 * 0.01 * math.sqrt(16.25) / 10)
    # a tail as large as sigma_k leaves no gap: nothing can be certified
    assert merge_svd.certified_bound(S, residual, 2, 3.0) == math.inf


def test_tail_norm_bound_is_an_upper_bound():
    D, U, V = _with_spectrum([6.0, 5.0, 4.0, 1.5, 1.0, 0.5])
    Q = U[:, :3].float()  # the exact top-3 range: the tail norm is sigma_4 = 1.5
    bound = merge_svd.tail_norm_bound(D.float(), Q, torch.Generator().manual_seed(0))
    # An upper bound, and not a loose one: 1.5 times the largest of 8 Gaussian components (~2) times
    # the safety factor 7.98, all to the power 1/7.
    assert 1.5 <= bound <= 1.5 * 1.7, f"tail bound {bound} for a tail norm of 1.5"


def test_a_bf16_power_step_saves_float32_products():
    # The default bfloat16 step only moves the start: the result is still certified against the
    # known best rank-8 approximation, with fewer float32 products (two of the count are bf16).
    spectrum = [10 - 0.25 * i for i in range(20)] + [0.5 * 0.97 ** i for i in range(75)]
    D, U, V = _with_spectrum(spectrum)
    best = (U[:, :8] * torch.tensor(spectrum[:8], dtype=torch.float64)) @ V[:, :8].T
    plain = merge_svd.randomized_svd(D.float(), 8, 40, warm_steps=0)
    warmed = merge_svd.randomized_svd(D.float(), 8, 40)
    for top in (plain, warmed):
        error = float(((top.U.double() * top.S.double()) @ top.Vh.double() - best).norm() / best.norm())
        assert top.solver == merge_svd.RANDOMIZED and error <= top.bound <= merge_svd.TOLERANCE, (
            f"{top.solver}: error {error:.2e}, bound {top.bound}")
    assert merge_svd.BF16_STEPS == 1 and warmed.products - 2 < plain.products, (
        f"float32 products: {warmed.products - 2} after the bf16 step, {plain.products} without")
