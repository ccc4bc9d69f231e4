"""Element-wise task-tensor maths shared by every merge family: pruning, sign election, disjoint merge.

These are the operations of ``peft.utils.merge_utils`` (task arithmetic, magnitude and random
pruning, TIES sign election and disjoint merge), written so that they give the same numbers as
peft (the same roundings, checked value for value against ``add_weighted_adapter`` in the tests),
with two differences that matter here:

- random pruning (DARE) takes a ``torch.Generator``; ``None`` draws from torch's global RNG exactly
  as peft does (one ``torch.bernoulli`` per tensor, in the order the tensors are given);
- magnitude pruning of full deltas can find the k-th largest magnitude by selection instead of
  ``torch.topk(k)``: the same k entries unless magnitudes tie at the threshold (see
  `magnitude_prune`), 9x faster on a 10240x1280 delta (82 ms vs 743 ms).

Full deltas are large (up to 13M entries at SDXL size), so the element-wise maths avoids boolean
masks where it can: on this CPU a float mask or a float formulation (``hardshrink``, ``copysign``,
``relu``, ``sign``) runs 5-20x faster than ``tensor * bool_mask`` with the same values, and works
in place on its own temporaries (a fresh 52 MB tensor costs page faults on every allocation).

It also holds what peft lacks: Model Breadcrumbs' outlier pruning (`outlier_prune`). The
``combine_*`` functions at the end are the maths of the merge methods declared in `merge_methods`.

A "task tensor" is one source's tensor (a LoRA factor, or a full delta); the lists given here hold
one per source, all of one shape, float32.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .merge_factors import Combine
from .merge_methods import SIGN_METHODS

SELECT_RULES = ("topk", "kth")
"""Valid `magnitude_prune` ``select`` values."""


def weight_vector(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """`weights` as a float32 vector shaped to broadcast over a stack of tensors like `like`.

    peft builds ``torch.tensor(list_of_floats)`` (float32) and multiplies the stacked tensors by it;
    doing the same keeps the results bit-identical.
    """
    w = torch.tensor(list(weights), dtype=torch.float32, device=like.device)
    return w.view(w.shape + (1,) * like.dim())


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Task arithmetic: ``sum_i weights[i] * tensors[i]``."""
    stacked = torch.stack(list(tensors), dim=0)
    return (stacked * weight_vector(weights, tensors[0])).sum(dim=0)


def magnitude_prune(tensor: torch.Tensor, density: float, *, select: str = "topk") -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest.

    ``select="topk"`` is peft's own ``torch.topk`` mask, including its choice among entries that tie
    at the threshold: factors read from bf16 files tie a lot (a 10240x32 factor had 797 entries at
    the median magnitude), so only topk itself keeps peft's entries there. ``select="kth"`` finds the
    threshold with `kth_largest` and keeps ties in row-major order: the same entries wherever no two
    magnitudes tie at the threshold (the case for full deltas, sums of products), and applies it
    with one float op into its own temporary (hardshrink), where multiplying by a boolean mask took
    10 ms on a 1280x1280 delta.
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    k = int(density * n)
    if select not in SELECT_RULES:
        raise ValueError(f"magnitude_prune select {select!r} is not 'topk' or 'kth'")
    if select == "topk":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    if k <= 0:
        return tensor * torch.zeros_like(tensor)
    magnitudes = tensor.abs().reshape(-1)
    threshold, at_least = kth_largest_count(magnitudes, k)
    # Entries tying at the threshold beyond the k-th (common above ~5M entries: float32 has 2^23
    # values per octave) are dropped from the end, so the first ones in row-major order stay.
    ties = torch.nonzero(magnitudes == threshold).flatten() if at_least > k else None
    # hardshrink keeps t where |t| exceeds the float just below the threshold (so |t| >= threshold)
    # and writes 0 elsewhere: the values of ``tensor * mask`` (a +0.0 where the product gives -0.0)
    # in one pass, into the magnitudes' buffer (a fresh full-size tensor costs page faults at SDXL
    # sizes); 7x faster than a threshold then a copysign on a 1280x1280 delta.
    below = float(torch.nextafter(threshold, threshold.new_zeros(()))) if float(threshold) > 0 else 0.0
    kept = torch.hardshrink(tensor.reshape(-1), below, out=magnitudes)
    if ties is not None:
        kept[ties[ties.numel() - (at_least - k):]] = 0
    return kept.reshape(tensor.shape)


def top_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the `k` largest entries of the 1-D `magnitudes`; ties at the threshold are
    kept in row-major order, so exactly ``k`` are True (none for ``k <= 0``), and the mask for a
    smaller k is always inside the mask for a larger one."""
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    threshold, at_least = kth_largest_count(magnitudes, k)
    keep = magnitudes >= threshold
    if at_least > k:  # several entries share the threshold magnitude: keep the first
        keep = magnitudes > threshold
        ties = torch.nonzero(magnitudes == threshold).flatten()[: k - int(torch.count_nonzero(keep))]
        keep[ties] = True
    return keep


def outlier_prune(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask: drop the ``int(gamma * numel)`` largest magnitudes (outliers) and the
    smallest, keeping ``k = int(density * numel)`` entries. When ``gamma + density > 1`` fewer
    outliers are dropped so that k entries stay (mergekit's rule); density 1 keeps everything.

    Ties are broken in row-major order (`top_mask`). Kept entries are not rescaled.
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    k = int(density * n)
    dropped = min(int(gamma * n), n - k)
    mag = tensor.abs().reshape(-1)
    keep = top_mask(mag, dropped + k).logical_and_(top_mask(mag, dropped).logical_not_())
    # A float mask: multiplying by a boolean one is ~10x slower (same values).
    return tensor * keep.reshape(tensor.shape).to(tensor.dtype)


_SAMPLE = 1 << 16


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the 1-D tensor `values` (exactly ``torch.kthvalue(values, n - k + 1)``).

    Large inputs: a strided sample brackets the answer, one pass counts the entries above the
    bracket and gathers those inside it, and the selection runs on that small band (about 10x less
    work at 13M entries). The counts prove the answer lies in the band; when an unlucky sample
    misses it, the plain kthvalue runs.
    """
    return kth_largest_count(values, k)[0]


def sample_stride(n: int) -> int:
    """The stride of `kth_largest`'s sample of n entries: the largest prime <= n / 2^16 (at least 13).

    Prime, so that it shares no factor with a matrix's row length (2^a 3^b 5^c at SDXL sizes): a
    stride of 200 on rows of 1280 visited only every 40th column, a biased sample whose bracket
    missed the answer and sent a 10240x1280 delta to the full kthvalue (0.3 s instead of 0.07 s).
    """
    stride = max(n // _SAMPLE, 13)
    while any(stride % d == 0 for d in range(2, math.isqrt(stride) + 1)):
        stride -= 1
    return stride


def kth_largest_count(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """`kth_largest` and how many entries are at least that value (``k`` unless values tie there)."""
    n = values.numel()
    if n <= 16 * _SAMPLE:
        value = torch.kthvalue(values, n - k + 1).values
        return value, int(torch.count_nonzero(values >= value))
    lo, hi = _bracket(values[:: sample_stride(n)], n, k)
    found = _select_in_band(*_band(values, lo, hi), k)
    if found is not None:
        return found
    value = torch.kthvalue(values, n - k + 1).values
    return value, int(torch.count_nonzero(values >= value))


def _bracket(sample: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``: order statistics of the strided `sample` of n values that bracket the k-th
    largest value unless the sample is unlucky (`_select_in_band` then finds it outside)."""
    s = sample.numel()
    below = (n - k) / n * s  # expected rank of the answer inside the sample
    margin = 6 * math.sqrt(max(below * (s - below) / s, 1.0)) + 8
    lo = torch.kthvalue(sample, max(1, math.floor(below - margin))).values
    hi = torch.kthvalue(sample, min(s, math.ceil(below + margin) + 1)).values
    return lo, hi


def _band(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How many `values` exceed `hi`, and the values in ``[lo, hi]`` (1-D, in order)."""
    over = values > hi
    above = int(torch.count_nonzero(over))  # count_nonzero: 30x faster than a bool sum
    # lo <= v <= hi is (v >= lo) xor (v > hi), as hi >= lo: one full-size pass fewer than two
    # comparisons and an and.
    return above, values[torch.ge(values, lo).logical_xor_(over)]


def _select_in_band(above: int, band: torch.Tensor, k: int) -> tuple[torch.Tensor, int] | None:
    """`kth_largest_count` from `_band`'s counts, or None where the counts prove the k-th largest
    value lies outside the band (the sample missed it)."""
    if above < k <= above + band.numel():
        value = torch.kthvalue(band, band.numel() - (k - above) + 1).values
        return value, above + int(torch.count_nonzero(band >= value))
    return None


def random_prune(
    tensor: torch.Tensor,
    density: float,
    generator: torch.Generator | None,
    *,
    mask_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescale the kept ones by ``1 / density``.

    The Bernoulli probabilities are built in `mask_dtype` (default: the tensor's dtype). peft builds
    them with ``full_like`` on the adapter's own dtype, so reproducing a bf16 adapter's draws needs
    ``mask_dtype=torch.bfloat16`` (0.7 rounds to 0.69921875 there).
    """
    if density >= 1:
        return tensor
    p = torch.full(tensor.shape, density, dtype=mask_dtype or tensor.dtype, device=tensor.device)
    mask = torch.bernoulli(p, generator=generator).to(tensor.dtype)
    del p
    # In place on the fresh mask: mask * tensor is tensor * mask, then / density, as peft rounds it.
    return mask.mul_(tensor).div_(density)


def elect_positive(tensors: Sequence[torch.Tensor], method: str) -> torch.Tensor:
    """TIES sign election: +1.0 where the elected sign is + (a tie or zero elects +, as in peft),
    -1.0 elsewhere, in the tensors' dtype (float signs: the disjoint merge then needs no boolean
    masks, which were most of its time).

    ``"total"`` elects the sign of the sum of the values, ``"frequency"`` the sign most sources hold.
    Sums run source by source in order: the same additions as peft's ``stack(...).sum(dim=0)``.
    """
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method {method!r} is not one of {SIGN_METHODS}")
    if method == "total":
        # One pass for the first sum (not a clone, then an add): the same additions in the same order.
        acc = torch.add(tensors[0], tensors[1]) if len(tensors) > 1 else tensors[0].clone()
        for t in tensors[2:]:
            acc += t
    else:
        acc = torch.sign(tensors[0])
        for t in tensors[1:]:
            acc += torch.sign(t)
    return acc.ge_(0).mul_(2).sub_(1)


def disjoint_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], signs: torch.Tensor, *,
                   consume: bool = False) -> torch.Tensor:
    """TIES disjoint merge: mean of ``weights[i] * tensors[i]`` over the sources whose sign agrees
    with the elected one (`signs`, +1/-1 from `elect_positive`); 0 where none does. Zero entries
    never agree (sign 0). `consume`: the tensors are the caller's temporaries and may be overwritten
    (no full-size allocation per source).

    peft computes ``sum_i (t_i * w_i) * agree_i / count``. Here ``relu(t_i * sign)`` is ``|t_i|``
    where t_i agrees and 0 elsewhere, so the sum is ``sign * sum_i |t_i| * w_i``: the same products
    and additions up to the sign, which IEEE rounding ignores, so the same values (a zero may be
    +0.0 where peft has -0.0). Float arithmetic throughout, one source at a time: 5x faster than
    boolean masks on a 1280x1280 delta pair.
    """
    mixed = count = kept = None
    for t, w in zip(tensors, weight_vector(weights, tensors[0]).flatten()):
        agreeing = (t.mul_(signs) if consume else torch.mul(t, signs)).relu_()
        if count is None:
            count = torch.sign(agreeing)
        else:
            kept = torch.sign(agreeing) if kept is None else torch.sign(agreeing, out=kept)
            count.add_(kept)
        term = agreeing.mul_(w)
        mixed = term if mixed is None else mixed.add_(term)
    return mixed.div_(count.clamp_(min=1.0)).mul_(signs)


# --- combinations: one per merge method's maths ------------------------------------------------
#
# A combination merges one task tensor per source into one. Its signature is its declaration (see
# `merge_methods`): ``(tensors, weights)`` then keyword-only names, each a `MergeOptions` field
# (annotated with the option's type) or a value the driver provides (``generator``, ``mask_dtypes``,
# ``select``). Pruning happens per source before weighting; TIES elects signs on the pruned,
# unweighted tensors (peft's order). Random draws go one tensor at a time, in order, each with its
# Bernoulli probabilities in ``mask_dtypes[i]`` (None: the tensor's dtype).


def combine_linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Task arithmetic: the weighted sum."""
    return weighted_sum(tensors, weights)


def combine_ties(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, density: float,
                 majority_sign_method: str, select: str) -> torch.Tensor:
    """TIES: magnitude-prune each source, elect signs, mean of the agreeing weighted entries."""
    pruned = [magnitude_prune(t, density, select=select) for t in tensors]
    signs = elect_positive(pruned, majority_sign_method)
    return disjoint_merge(pruned, weights, signs, consume=density < 1)


def combine_magnitude_prune(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, density: float,
                            select: str) -> torch.Tensor:
    """Magnitude-prune each source, then the weighted sum."""
    return weighted_sum([magnitude_prune(t, density, select=select) for t in tensors], weights)


def _dare(tensors, density, generator, mask_dtypes) -> list[torch.Tensor]:
    dtypes = mask_dtypes or [None] * len(tensors)
    return [random_prune(t, density, generator, mask_dtype=d) for t, d in zip(tensors, dtypes)]


def combine_dare_linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, density: float,
                        generator: torch.Generator | None,
                        mask_dtypes: Sequence[torch.dtype] | None) -> torch.Tensor:
    """DARE: random pruning with rescale of each source, then the weighted sum."""
    return weighted_sum(_dare(tensors, density, generator, mask_dtypes), weights)


def combine_dare_ties(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, density: float,
                      majority_sign_method: str, generator: torch.Generator | None,
                      mask_dtypes: Sequence[torch.dtype] | None) -> torch.Tensor:
    """DARE pruning, then TIES sign election and disjoint merge."""
    pruned = _dare(tensors, density, generator, mask_dtypes)
    signs = elect_positive(pruned, majority_sign_method)
    return disjoint_merge(pruned, weights, signs, consume=density < 1)


def combine_breadcrumbs(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, density: float,
                        gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023; mergekit's ``breadcrumbs``): `outlier_prune` each
    source, then the weighted sum (no rescale, no sign election)."""
    return weighted_sum([outlier_prune(t, density, gamma) for t in tensors], weights)


# --- combinations of products, row chunk by row chunk ------------------------------------------
#
# The pruning SVD forms combine full deltas ``B_i @ A_i`` (up to 10240x1280 at SDXL size, 52 MB
# each). Formed whole, every element-wise step of pruning, sign election and disjoint merge is a
# pass through main memory (about 30 of them for TIES on two sources, plus page faults on fresh
# tensors). `combine_products` computes the same numbers with fewer passes: each source's delta is
# formed once and its magnitude threshold found from 1 MB pieces of it; then pruning and the
# combination (the same functions as above) run on 1 MB row chunks of all sources while they are in
# cache, writing the result into the first delta's memory.

ROW_CHUNK = 1 << 18
"""Entries per row chunk of `combine_products` (1 MB of float32). Measured for TIES at SDXL shapes (722
modules, one thread, a loaded machine): 2^18 and 2^20 entries 36 s and 35 s, 2^16 39 s, the
whole-tensor maths 61 s."""


class _Pruning:
    """One source's magnitude threshold for `magnitude_prune` with ``select="kth"``, and how many
    entries tied at it are still to keep (row-major order; None where no ties must be dropped)."""

    def __init__(self, threshold: torch.Tensor, ties_left: int | None):
        self.threshold = threshold
        # hardshrink keeps t where |t| exceeds the float just below the threshold (see magnitude_prune).
        self.below = float(torch.nextafter(threshold, threshold.new_zeros(()))) if float(threshold) > 0 else 0.0
        self.ties_left = ties_left

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (the next rows of the source, in order) pruned in place."""
        drop = None
        if self.ties_left is not None:
            ties = torch.nonzero(rows.reshape(-1).abs() == self.threshold).flatten()
            drop = ties[self.ties_left:]
            self.ties_left = max(0, self.ties_left - ties.numel())
        torch.hardshrink(rows, self.below, out=rows)
        if drop is not None and drop.numel():
            rows.view(-1)[drop] = 0
        return rows


def _product_pruning(up: torch.Tensor, down: torch.Tensor, k: int, step: int) -> tuple[torch.Tensor, _Pruning]:
    """``up @ down`` and the `_Pruning` keeping its k largest magnitudes (`kth_largest_count`): the
    band of the selection is gathered `step` rows at a time, from magnitudes that stay in cache."""
    m, n = up.shape[0], down.shape[1]
    total = m * n
    product = up @ down
    found = lo = None
    if total > 16 * _SAMPLE:
        lo, hi = _bracket(product.view(-1)[:: sample_stride(total)].abs(), total, k)
        magnitudes = torch.empty(min(step, m), n, dtype=up.dtype, device=up.device)
        above, bands = 0, []
        for r in range(0, m, step):
            rows = product[r:r + step]
            a, band = _band(torch.abs(rows, out=magnitudes[: rows.shape[0]]).reshape(-1), lo, hi)
            above, bands = above + a, bands + [band]
    if lo is not None:
        found = _select_in_band(above, torch.cat(bands), k)
    if found is None:
        found = kth_largest_count(product.abs().reshape(-1), k)
    threshold, at_least = found
    if at_least == k:
        return product, _Pruning(threshold, None)
    # More entries than k tie at the threshold: the last (at_least - k) of them in row-major order
    # are dropped, as magnitude_prune does.
    tied = int(torch.count_nonzero(product.abs() == threshold))
    return product, _Pruning(threshold, tied - (at_least - k))


def _ties_rows(pruned, weights, options):
    signs = elect_positive(pruned, options["majority_sign_method"])
    return disjoint_merge(pruned, weights, signs, consume=True)


def _sum_rows(pruned, weights, options):
    return weighted_sum(pruned, weights)


_AFTER_MAGNITUDE_PRUNING = {combine_ties: _ties_rows, combine_magnitude_prune: _sum_rows}
"""The combinations `combine_products` runs by rows, each as what follows its pruning."""


def combine_products(combine: Combine, ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor],
                     weights: Sequence[float]) -> torch.Tensor | None:
    """``combine([up @ down for each source], weights)``, the same values, in row chunks that stay in cache.

    `combine` is a combination with its options bound (``functools.partial``, see
    `merge_methods.MergeMethod.bind`); `ups` [m, r_i] and `downs` [r_i, n] are float32. Runs for
    `combine_ties` and `combine_magnitude_prune` with ``select="kth"`` and ``density < 1`` (their
    pruning keeps a source's k largest magnitudes: a threshold per source, then element-wise maths
    that runs row chunk by row chunk); returns None for any other combination (DARE's draws go
    tensor by tensor), which the caller then runs on the formed products.
    """
    after = _AFTER_MAGNITUDE_PRUNING.get(getattr(combine, "func", None))
    options = getattr(combine, "keywords", {})
    if after is None or options.get("select") != "kth" or options["density"] >= 1:
        return None
    m, n = ups[0].shape[0], downs[0].shape[1]
    k = int(options["density"] * (m * n))  # magnitude_prune's count: (density * m) * n can round differently
    if k <= 0 or m * n == 0:
        return None
    step = max(1, ROW_CHUNK // n)
    formed = [_product_pruning(u, d, k, step) for u, d in zip(ups, downs)]
    # The result goes into the first product's rows once they are combined (no fresh full-size
    # tensor, whose page faults cost more than the chunk maths); TIES' disjoint merge already
    # leaves it there.
    out = formed[0][0]
    for r in range(0, m, step):
        pruned = [p.apply(product[r:r + step]) for product, p in formed]
        rows = after(pruned, weights, options)
        if rows.data_ptr() != pruned[0].data_ptr():
            pruned[0].copy_(rows)
    return out
