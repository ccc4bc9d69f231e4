"""lora/merge_ops.py: the element-wise operations of the merge methods (pruning, sign election,
TIES, DARE, Model Breadcrumbs' outlier pruning, k-th largest selection), hand-computed."""
from __future__ import annotations

import functools

import peft.utils.merge_utils as peft_merge_utils
import pytest
import torch

from loraloom.lora import merge_ops


def test_ties_hand_computed():
    t1, t2 = torch.tensor([3.0, -1.0, 2.0, 0.0]), torch.tensor([-1.0, -2.0, 4.0, 5.0])
    # prune to the top 2 magnitudes: [3, 0, 2, 0] and [0, 0, 4, 5]; elected signs all + (sum 3, 0, 6, 5)
    out = merge_ops.combine_ties([t1, t2], [1.0, 1.0], density=0.5, majority_sign_method="total", select="topk")
    assert out.tolist() == [3.0, 0.0, 3.0, 5.0], f"TIES mean of agreeing entries, got {out.tolist()}"


@pytest.mark.parametrize("rule, expected", [("total", -5.0), ("frequency", 1.0)])
def test_sign_election_rules(rule, expected):
    # total: -5 + 1 + 1 < 0 elects -, keeping -5; frequency: two + against one - elects +, mean of 1, 1.
    tensors = [torch.tensor([-5.0]), torch.tensor([1.0]), torch.tensor([1.0])]
    out = merge_ops.combine_ties(tensors, [1.0] * 3, density=1.0, majority_sign_method=rule, select="topk")
    assert out.item() == expected, f"{rule}: expected {expected}, got {out.item()}"


def test_magnitude_prune_keeps_exactly_k_with_ties():
    t = torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5])
    out = merge_ops.magnitude_prune(t, 0.4, select="kth")  # k = 2 of three tied magnitudes 2: the first two
    assert out.tolist() == [0.0, -2.0, 2.0, 0.0, 0.0], f"got {out.tolist()}"
    assert (merge_ops.magnitude_prune(t, 0.4) != 0).sum() == 2, "topk also keeps exactly k = 2"
    for select in ("topk", "kth"):
        assert merge_ops.magnitude_prune(t, 0.1, select=select).abs().sum() == 0, "k = int(0.1 * 5) = 0 keeps nothing"


@pytest.mark.parametrize("case", ["random", "ties", "sparse", "unlucky sample"])
def test_kth_largest_equals_kthvalue(case):
    # Above 2^20 entries kth_largest selects within a band bracketed by a strided sample.
    n = 1_500_000
    g = torch.Generator().manual_seed(0)
    values = torch.randn(n, generator=g).abs()
    if case == "ties":
        values = values.mul(4).round()
    elif case == "sparse":
        values[torch.rand(n, generator=g) < 0.7] = 0
    elif case == "unlucky sample":
        values[:: merge_ops.sample_stride(n)] = 0  # the sample sees only zeros: the plain kthvalue must run
    for k in (1, 1000, n // 2, n - 5, n):
        got, want = merge_ops.kth_largest(values, k), torch.kthvalue(values, n - k + 1).values
        assert got.item() == want.item(), f"{case}, k={k}: {got.item()} != {want.item()}"


def test_sample_stride_is_prime_and_visits_every_column():
    # 10240x1280 (a GEGLU projection at SDXL size): n // 2^16 = 200 shares 40 with the row length.
    n, row = 10240 * 1280, 1280
    stride = merge_ops.sample_stride(n)
    assert stride <= n // merge_ops._SAMPLE and all(stride % d for d in range(2, stride)), f"{stride} is not prime"
    columns = {(i * stride) % row for i in range(n // stride)}
    assert len(columns) == row, f"stride {stride} samples {len(columns)} of {row} columns"


def test_dare_rescales_kept_entries():
    t = torch.full((1000,), 3.0)
    out = merge_ops.random_prune(t, 0.25, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0.0, 12.0}, "kept entries are divided by the density"
    assert 0.2 < (out > 0).float().mean().item() < 0.3, "about a quarter kept"


@pytest.mark.parametrize("density, gamma, expected", [
    # n = 10, k = int(density * n) kept after dropping int(gamma * n) outliers (magnitudes 8, 6, 5, 4, 3, 2, ...)
    (0.5, 0.1, [5.0, -4.0, 3.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, -6.0]),  # drop 8; keep 6, 5, 4, 3, 2
    (0.5, 0.25, [5.0, -4.0, 3.0, -2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),  # int(2.5) = 2: drop 8 and -6
    (0.9, 0.25, [5.0, -4.0, 3.0, -2.0, 1.0, 0.5, -0.25, 0.1, 0.0, -6.0]),  # keep 9: only 8 can go
    (0.5, 0.0, [5.0, -4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0, -6.0]),  # gamma 0 is magnitude pruning
])
def test_outlier_prune_hand_computed(density, gamma, expected):
    t = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, -0.25, 0.1, 8.0, -6.0])
    out = merge_ops.outlier_prune(t, density, gamma)
    assert torch.equal(out, torch.tensor(expected)), out.tolist()


def test_outlier_prune_breaks_ties_in_row_major_order():
    # k = 2 kept after 1 outlier; three entries tie at magnitude 2: the first is the outlier, the next two stay.
    out = merge_ops.outlier_prune(torch.tensor([[2.0, -2.0], [1.0, 2.0]]), 0.5, 0.25)
    assert out.tolist() == [[0.0, -2.0], [0.0, 2.0]], out.tolist()


@pytest.mark.parametrize("combination", ["combine_ties", "combine_dare_ties", "combine_magnitude_prune",
                                         "combine_dare_linear"])
@pytest.mark.parametrize("density", [0.5, 1.0])
def test_combinations_leave_their_inputs_alone(combination, density):
    # The pruning and TIES steps work in place on their own temporaries only: the factor-wise
    # methods pass the LoRA's own factors in.
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(40, 30, generator=g) for _ in range(3)]
    copies = [t.clone() for t in tensors]
    options = {"density": density}
    if "ties" in combination:
        options["majority_sign_method"] = "total"
    if "dare" in combination:
        options.update(generator=torch.Generator().manual_seed(1), mask_dtypes=None)
    else:
        options["select"] = "kth"
    getattr(merge_ops, combination)(tensors, [1.0, -0.5, 0.7], **options)
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies)), f"{combination} changed its inputs"


def test_magnitude_prune_kth_keeps_the_first_ties_in_row_major_order_at_scale():
    # Above 2^20 entries (the sampled selection) with ties at the threshold: exactly k kept, the
    # earlier tied entries first, the values and signs of the tensor itself.
    n = 1_200_000
    t = torch.arange(n, dtype=torch.float32).remainder_(1000).sub_(500.0)  # every magnitude appears ~2400 times
    k = int(0.3 * n)
    out = merge_ops.magnitude_prune(t, 0.3, select="kth")
    kept = out != 0
    assert int(kept.sum()) == k, f"kept {int(kept.sum())}, expected {k}"
    threshold = t.abs()[kept].min()
    assert bool((t.abs() > threshold).le(kept).all()), "every magnitude above the threshold is kept"
    tied = torch.nonzero(t.abs() == threshold).flatten()
    tied_kept = kept[tied]
    assert bool(tied_kept[: int(tied_kept.sum())].all()), "ties are kept in row-major order"
    assert torch.equal(out[kept], t[kept]), "kept entries are the tensor's own values"


def test_magnitude_prune_kth_equals_topk_on_a_full_delta():
    # A sum of products (no tied magnitudes), above 2^20 entries: selection keeps topk's entries,
    # with the delta's own values, and zeros elsewhere.
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(1100, 8, generator=g) @ torch.randn(8, 1000, generator=g)
    for density in (0.1, 0.5, 0.9):
        kth = merge_ops.magnitude_prune(delta, density, select="kth")
        topk = merge_ops.magnitude_prune(delta, density, select="topk")
        assert torch.equal(kth, topk), f"density {density}: kth and topk keep different entries"
        assert int(torch.count_nonzero(kth)) == int(density * delta.numel())


def _bound(name, **options):
    return functools.partial(getattr(merge_ops, name), **options)


def test_combine_products_hand_computed(monkeypatch):
    # One row per chunk, so the tie rule has to carry across chunks.
    monkeypatch.setattr(merge_ops, "ROW_CHUNK", 2)
    ups = [torch.tensor([[1.0], [2.0]]), torch.tensor([[-1.0], [1.0]])]
    downs = [torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, 1.0]])]
    # Products [[3, -1], [6, -2]] and [[-1, -1], [1, 1]]. Keeping 2 of 4: [[3, 0], [6, 0]], and of four
    # tied magnitudes 1 the first two in row-major order, [[-1, -1], [0, 0]]. Elected signs (sum):
    # +, -, +, + (a zero sum elects +). Agreeing means: 3, -1, 6, and 0 where none agrees.
    ties = merge_ops.combine_products(_bound("combine_ties", density=0.5, majority_sign_method="total", select="kth"),
                                      ups, downs, [1.0, 1.0])
    assert ties.tolist() == [[3.0, -1.0], [6.0, 0.0]], f"got {ties.tolist()}"
    summed = merge_ops.combine_products(_bound("combine_magnitude_prune", density=0.5, select="kth"),
                                        ups, downs, [1.0, 0.5])
    assert summed.tolist() == [[2.5, -0.5], [6.0, 0.0]], f"got {summed.tolist()}"


PRODUCT_COMBINATIONS = [
    ("combine_ties", dict(density=0.5, majority_sign_method="total")),
    ("combine_ties", dict(density=0.2, majority_sign_method="frequency")),
    ("combine_magnitude_prune", dict(density=0.7)),
]


@pytest.mark.parametrize("name, options", PRODUCT_COMBINATIONS)
@pytest.mark.parametrize("shape, tied", [((37, 29), False), ((37, 29), True), ((1100, 1000), False),
                                         ((1100, 1000), True), ((320, 576), False)])
def test_combine_products_equals_the_combination_of_the_formed_products(name, options, shape, tied):
    # Bit for bit, for three sources, below and above 2^20 entries (the sampled selection), with
    # and without magnitudes tied at the threshold (small integer factors). At 320x576, 0.7 * 320
    # * 576 rounds to one more kept entry than 0.7 * (320 * 576), magnitude_prune's count.
    m, n = shape
    g = torch.Generator().manual_seed(5)
    ups, downs = [], []
    for r in (4, 2, 3):
        up, down = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
        if tied:
            up, down = up.mul(2).round(), down.mul(2).round()
        ups.append(up)
        downs.append(down)
    combine = _bound(name, select="kth", **options)
    products = [u @ d for u, d in zip(ups, downs)]
    want = combine(products, [1.0, -0.5, 0.7])
    got = merge_ops.combine_products(combine, ups, downs, [1.0, -0.5, 0.7])
    assert torch.equal(got, want), f"{name} {options} {shape}: {(got - want).abs().max().item()} apart"
    if tied:
        magnitudes = products[0].abs().reshape(-1)
        threshold = merge_ops.kth_largest(magnitudes, int(options["density"] * m * n))
        assert int(torch.count_nonzero(magnitudes == threshold)) > 1, "the test needs ties at the threshold"


def test_combine_products_matches_peft_merge_utils():
    # peft's ties and magnitude pruning (topk masks) on the formed deltas: no tied magnitudes here.
    g = torch.Generator().manual_seed(6)
    ups = [torch.randn(40, 3, generator=g) for _ in range(2)]
    downs = [torch.randn(3, 30, generator=g) for _ in range(2)]
    deltas = [u @ d for u, d in zip(ups, downs)]
    weights = torch.tensor([1.0, 0.6])
    for method in ("total", "frequency"):
        theirs = peft_merge_utils.ties(deltas, weights, 0.4, method)
        ours = merge_ops.combine_products(_bound("combine_ties", density=0.4, majority_sign_method=method,
                                                 select="kth"), ups, downs, weights.tolist())
        assert torch.equal(ours, theirs), f"ties {method}: {(ours - theirs).abs().max().item()} from peft"
    theirs = peft_merge_utils.magnitude_prune(deltas, weights, 0.4)
    ours = merge_ops.combine_products(_bound("combine_magnitude_prune", density=0.4, select="kth"), ups, downs,
                                      weights.tolist())
    assert torch.equal(ours, theirs), f"magnitude_prune: {(ours - theirs).abs().max().item()} from peft"


@pytest.mark.parametrize("name, options", [
    ("combine_ties", dict(density=0.5, majority_sign_method="total", select="topk")),  # peft's topk ties
    ("combine_ties", dict(density=1.0, majority_sign_method="total", select="kth")),  # prunes nothing
    ("combine_magnitude_prune", dict(density=0.0, select="kth")),  # keeps nothing
    ("combine_dare_ties", dict(density=0.5, majority_sign_method="total", generator=None, mask_dtypes=None)),
    ("combine_linear", {}),
])
def test_combine_products_leaves_other_combinations_to_the_formed_products(name, options):
    ups, downs = [torch.ones(4, 1)], [torch.ones(1, 4)]
    assert merge_ops.combine_products(_bound(name, **options), ups, downs, [1.0]) is None
