"""Merges that end in a truncated SVD: ``svd`` and the pruning ``*_svd`` forms.

peft's ``_svd_generalized_task_arithmetic_weighted_adapter`` forms every source's full delta
``s_i * B_i @ A_i``, combines them (task arithmetic, TIES, DARE or magnitude pruning, with the
weights), runs a dense ``torch.linalg.svd(full_matrices=True)`` of the result (conv deltas
flattened to ``[out, in*kh*kw]``), keeps ``up = U[:, :k] * S[:k]`` and ``down = Vh[:k]``, and may
clamp both at a quantile. Here:

- ``svd`` never forms a delta. ``sum_i c_i B_i A_i = [c_1 B_1, c_2 B_2, ...] @ [A_1; A_2; ...]``:
  QR of both stacked factors, SVD of the small core ``R_B @ R_A^T`` (side = sum of ranks), then
  truncation give the same singular triplets as the dense SVD (measured: 1.5 s vs peft's 535 s at
  SDXL shapes, within 1.5e-5).
- The pruning forms (``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``,
  and ``breadcrumbs_svd``, not in peft) prune full deltas element-wise, so the full delta is
  unavoidable and full rank. Its top-k SVD comes from `randomized_svd`: a randomized range finder
  (Halko, Martinsson & Tropp 2011) started from the sources' own row spaces, with power iterations,
  that stops only when an a-posteriori bound certifies the result: the relative distance between
  our rank-k product and the exact best rank-k approximation (peft's, up to its own rounding) is at
  most `TOLERANCE`. Where the bound cannot get there (singular values tied or nearly tied at k, a
  flat spectrum, fp32 rounding), the module falls back to the exact thin SVD. Every module reports
  its solver and bound (`SvdMerge`). `top_svd`, the block subspace iteration used before (stopped
  when the product stopped moving, no bound), stays as the benchmark's reference.
  With density 1 the forms without sign election prune nothing and take the ``svd`` path.

Singular vectors have arbitrary signs; peft's clamp takes a quantile of the signed entries, so with
``svd_clamp`` the clamp threshold depends on those signs: the clamp rule is peft's, but results
can differ from peft's clamped adapter by far more than the SVD tolerance (0.19 relative on one
test module).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .merge_factors import Combine
from .merge_ops import combine_products

OVERSAMPLE = 16
"""Extra block columns in `randomized_svd` / `top_svd` beyond max(k, sum of source ranks)."""
TOLERANCE = 1e-4
"""Certified relative distance from the exact rank-k truncation at which `randomized_svd` stops:
a tenth of what the tests allow against peft (1e-3); the products it returns are typically 5-10x
closer than the bound says (measured)."""
MAX_POWER_ITERATIONS = 8
"""Power iterations before `randomized_svd` gives up and runs the exact thin SVD."""
BF16_STEPS = 1
"""Power iterations `randomized_svd` runs in bfloat16 before its float32 ones (`_bf16_power_steps`)."""
PROBES = 8
"""Gaussian probes of the tail norm estimate: the bound fails with probability at most 10^-PROBES."""
PROBE_POWER = 3
"""Power steps of the tail norm estimate: its safety factor 7.98^(1/7) = 1.35 instead of 7.98."""
MAX_ITERATIONS = 12
"""Subspace iterations before `top_svd` gives up and runs the exact thin SVD."""
SUBSPACE_TOLERANCE = 1e-5
"""Estimated relative error of the rank-k result at which `top_svd` stops iterating."""
_QUANTILE_LIMIT = 1 << 24  # torch.quantile refuses larger inputs


@dataclass(frozen=True)
class SvdMerge:
    """A truncated-SVD merge: ``up`` [out, k], ``down`` [k, in*kh*kw] (float32, not yet reshaped).

    ``kept_energy``/``total_energy`` are the sums of kept and of all squared singular values of the
    matrix that was decomposed; ``solver`` names how its SVD was computed; ``bound`` (randomized
    solver only, else None: an exact SVD, fp32 rounding only) is the certified upper bound of
    ``||up @ down - best rank-k||_F / ||best rank-k||_F`` (see `randomized_svd`).
    """

    down: torch.Tensor
    up: torch.Tensor
    kept_energy: float
    total_energy: float
    solver: str
    bound: float | None = None


def _truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # clone, not contiguous(): a row slice is already contiguous, and keeping it as a view would keep
    # the whole Vh alive (peft's merged adapters hold 12 GB that way at SDXL size, measured).
    return Vh[:k].clone(), (U[:, :k] * S[:k]).contiguous()


def stacked_svd(
    downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], coeffs: Sequence[float], rank: int
) -> SvdMerge:
    """Rank-`rank` SVD of ``sum_i coeffs[i] * ups[i] @ downs[i]`` without forming it.

    `downs` are ``[r_i, n]``, `ups` ``[m, r_i]`` (float32, conv already flattened). The returned
    rank is ``min(rank, sum r_i, m, n)``: beyond the stacked rank the product has no singular
    values (peft's extra columns there are rounding noise, ~1e-7 of the largest).
    """
    up_stack = torch.cat([u * c for u, c in zip(ups, coeffs)], dim=1)
    down_stack = torch.cat(list(downs), dim=0)
    q_up, r_up = torch.linalg.qr(up_stack)
    q_down, r_down = torch.linalg.qr(down_stack.T)
    Uc, S, Vhc = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    k = min(rank, S.numel())
    down, up = _truncate(q_up @ Uc[:, :k], S, Vhc[:k] @ q_down.T, k)
    energy = S.double().square()
    return SvdMerge(down, up, float(energy[:k].sum()), float(energy.sum()), "stacked-qr")


RANDOMIZED = "randomized"
"""`SvdMerge.solver` of a module `randomized_svd` certified."""
FALLBACK = "thin-svd (randomized SVD not certified)"
"""`SvdMerge.solver` of a module where `randomized_svd` could not certify and ran the exact thin SVD."""


class TopSvd(NamedTuple):
    """Top singular triplets ``U`` [m, k], ``S`` [k], ``Vh`` [k, n]; how they were computed
    (``solver``; ``products``: products with the full matrix, the tail estimate's left out) and the
    certified ``bound`` (None: exact SVD)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    solver: str
    bound: float | None = None
    products: int = 0


def _thin_svd(D: torch.Tensor, rank: int, solver: str, products: int = 0) -> TopSvd:
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return TopSvd(U[:, :rank], S[:rank], Vh[:rank], solver, None, products)


def tail_norm_bound(D: torch.Tensor, Q: torch.Tensor, generator: torch.Generator,
                    probes: int = PROBES, power: int = PROBE_POWER) -> float:
    """An upper bound of ``||(I - Q Q^T) D||_2`` that holds with probability at least ``1 - 10^-probes``.

    Halko, Martinsson & Tropp (2011), Lemma 4.1: for Gaussian vectors w_i, ``||B|| <= 10 sqrt(2/pi)
    max_i ||B w_i||`` except with probability ``10^-probes``. Applied to ``B = (E E^T)^power E``,
    whose norm is ``||E||^(2 power + 1)``, the safety factor shrinks to its (2 power + 1)-th root.
    Vectors are renormalised each step (their growth is summed as logarithms: no under/overflow).
    """
    # Probes are kept as rows ([probes, n]) and multiplied from the left (x^T D^T, y^T D): with MKL
    # on one thread that layout of a thin product is 2.5-12x faster than D @ x / D^T @ y (measured on
    # a 10240x1280 delta: 8.3 and 6.8 ms against 16 and 84 ms for 8 probes).
    n = D.shape[1]
    x = torch.randn(probes, n, generator=generator, dtype=D.dtype, device=D.device)
    log_growth = torch.zeros(probes, dtype=torch.float64, device=D.device)

    def project_out(y):  # E x = (I - Q Q^T) D x; and E^T y = D^T y once y is orthogonal to Q
        return y - (y @ Q) @ Q.T

    def normalise(t):
        norms = torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)
        log_growth.add_(norms.flatten().double().log())
        return t / norms

    y = project_out(x @ D.T)
    for _ in range(power):
        x = normalise(normalise(y) @ D)
        y = project_out(x @ D.T)
    log_growth.add_(torch.linalg.vector_norm(y, dim=1).double().clamp_min(1e-300).log())
    return math.exp((math.log(10 * math.sqrt(2 / math.pi)) + float(log_growth.max())) / (2 * power + 1))


def certified_bound(S: torch.Tensor, residual_sq: torch.Tensor, rank: int, tail: float) -> float:
    """Bound on ``||A_k - D_k||_F / ||D_k||_F`` for Rayleigh-Ritz triplets of `D` from a subspace Q.

    `S` (float64, descending, length l) are the singular values of ``Q^T D = U~ S V~^T``;
    `residual_sq[j]` is ``||(I - Q Q^T) D v~_j||^2``; `tail` bounds ``||(I - Q Q^T) D||_2``;
    ``A_k = Q U~_k S_k V~_k^T`` is what we return, ``D_k`` the exact best rank-k approximation.
    In the bases (Q U~, its complement) and (V~, its complement) D is ``[[S_k, 0], [F, G]]`` with
    ``||F||_F^2 = sum(residual_sq[:k])``. Wedin's sin-theta theorem, with A = D minus F (whose top-k
    triplets are ours when S_k exceeds ||G||), gives ``||sin Phi||_F <= sqrt(2) ||F||_F / delta``
    where ``delta = S_k - ||G||_2`` (``sigma_k(D) >= S_k``). For any split s of the remaining Ritz
    columns, ``||G||_2 <= max(S_{k+1}, sqrt(S_{k+s+1}^2 + tail^2)) + ||F_s||_2`` where ``F_s``
    holds residual columns k+1..k+s (bounded by its Frobenius norm); the best s is taken. Then
    ``||A_k - D_k||_F = ||(P~ - P) D||_F <= 2 ||F||_F / delta * sigma_1(D)`` with ``sigma_1(D) <=
    sqrt(S_1^2 + tail^2)`` and ``||D_k||_F >= ||S_k||``. inf when no positive delta exists.
    """
    k, l = rank, S.numel()
    if k > l or float(S[:k].square().sum()) == 0.0:
        return math.inf
    padded = torch.cat([S, S.new_zeros(1)])
    coupling = torch.cat([S.new_zeros(1), residual_sq[k:].cumsum(0)]).sqrt()  # ||F_s||_F for s = 0..l-k
    inner = torch.sqrt(padded[k:].square() + tail ** 2).clamp_min(float(padded[k]))
    delta = float(S[k - 1]) - float((inner + coupling).min())
    if delta <= 0:
        return math.inf
    f_norm = float(residual_sq[:k].sum().sqrt())
    return 2.0 * f_norm * math.sqrt(float(S[0]) ** 2 + tail ** 2) / (delta * float(S[:k].square().sum().sqrt()))


def randomized_svd(D: torch.Tensor, rank: int, block: int, start: torch.Tensor | None = None, *,
                   tolerance: float = TOLERANCE, warm_steps: int = BF16_STEPS) -> TopSvd:
    """Top-`rank` singular triplets of the dense matrix `D` [m, n], certified within `tolerance`.

    A randomized range finder with power iterations (Halko, Martinsson & Tropp 2011) on a block of
    `block` columns (at least `rank`), using only products with D. The test matrix holds `start`
    [n, s] (orthonormalised; the sources' row spaces, where a pruned sum of LoRA deltas keeps most of
    its energy: measured, this saves about one power iteration) and Gaussian columns from a private
    generator with a fixed seed (results never depend on, nor disturb, torch's global RNG). A float32
    D first takes `warm_steps` power iterations in bfloat16 (`_bf16_power_steps`; counted in
    ``products``, two each); everything after them, the certificate included, is float32.

    The products alternate between D and D^T (a power iteration is two of them), and every product
    both extends the iteration and completes a certificate: with Q an orthonormal basis of the last
    product's range on one side of M (M is D or D^T), the next product ``Z = M^T Q`` gives the
    Rayleigh-Ritz triplets of M in span(Q) (an SVD of a block-sized core, ``Q^T M = Z^T``), and the
    product after it, ``M Qz`` with ``Qz`` a basis of span(Z), gives their residuals
    (`certified_bound`) and the basis of the next step. So the bound is checked after every
    product, not every other one: a module certified half-way through a power iteration stops
    there (measured: one product less on 310 of SDXL's 722 modules, the larger ones: 6 instead of
    7 on 10240x1280). Once the bound, with the tail norm at its smallest, could pass, the tail norm
    is estimated (`tail_norm_bound`, on M); it returns when the bound is at most `tolerance`. Falls
    back to ``torch.linalg.svd(full_matrices=False)`` when the block is not much smaller than the
    matrix (no gain), when the residual stops shrinking (less than halved over a power iteration: fp32
    rounding, a flat spectrum) or after `MAX_POWER_ITERATIONS`; the solver name says which.
    """
    m, n = D.shape
    small = min(m, n)
    q = min(max(block, rank), small)
    if 4 * q > small:
        return _thin_svd(D, rank, "thin-svd")
    generator = torch.Generator(device=D.device).manual_seed(0)
    columns = []
    if start is not None and start.shape[1] > 0:
        columns.append(torch.linalg.qr(start[:, : q - 1].to(D.dtype)).Q)
    columns.append(torch.randn(n, q - sum(c.shape[1] for c in columns), generator=generator, dtype=D.dtype,
                               device=D.device))
    start_block = torch.cat(columns, dim=1)
    warm = warm_steps if D.dtype == torch.float32 else 0
    if warm:
        start_block = _bf16_power_steps(D, start_block, warm)
    M, Q = D, torch.linalg.qr(D @ start_block).Q  # Q: a basis of M's range
    transposed = False  # M is D^T
    Z = M.T @ Q
    history = [math.inf, math.inf]  # residual norms of the last two checks
    for products in range(3 + 2 * warm, 2 * (MAX_POWER_ITERATIONS + warm) + 2):  # products done at each check
        Qz, Rz = torch.linalg.qr(Z)
        Ur, S, Vrh = torch.linalg.svd(Rz.T)  # Q^T M = Rz^T Qz^T = Ur S (Qz Vrh^T)^T
        U = Q @ Ur
        Z_next = M @ Qz  # = M^T' Q' for the transposed step: basis Qz of M^T's range
        residual_sq = (Z_next @ Vrh.T - U * S).double().square().sum(dim=0)  # M V - U S, V = Qz Vrh^T
        S64 = S.double()
        if certified_bound(S64, residual_sq, rank, 0.0) <= tolerance:
            bound = certified_bound(S64, residual_sq, rank, tail_norm_bound(M, Q, generator))
            if bound <= tolerance:
                V = Qz @ Vrh.T
                if not transposed:
                    return TopSvd(U[:, :rank], S[:rank], V[:, :rank].T, RANDOMIZED, bound, products)
                return TopSvd(V[:, :rank], S[:rank], U[:, :rank].T, RANDOMIZED, bound, products)
        f_norm = float(residual_sq[:rank].sum().sqrt())
        if f_norm >= 0.5 * history[0]:  # stalled: the fp32 rounding floor, a spectrum too flat to converge, D = 0
            return _thin_svd(D, rank, FALLBACK, products)
        history = [history[1], f_norm]
        M, Q, Z, transposed = M.T, Qz, Z_next, not transposed
    return _thin_svd(D, rank, FALLBACK, 2 * (MAX_POWER_ITERATIONS + warm) + 1)


def _bf16_power_steps(D: torch.Tensor, V: torch.Tensor, steps: int) -> torch.Tensor:
    """`V` [n, q] moved `steps` power iterations towards D's top right singular vectors, with the
    products in bfloat16 (fp32 accumulation): an orthonormal [n, q] float32 start for the fp32
    iterations. Only the start changes: `randomized_svd` certifies with fp32 products alone.

    On this CPU (AVX512-BF16) a bf16 product with a 10240x1280 delta takes 11 ms against 38 ms in
    fp32 (measured). bf16 keeps about three digits of D, so these steps cannot certify anything
    themselves; as a start they are worth more than their cost: one step here saved two fp32
    products on the SDXL modules (7 -> 5 on 1280x1280, 6 -> 4 on 10240x1280, measured).
    """
    D16 = D.to(torch.bfloat16)
    for _ in range(steps):
        # No orthonormalisation between the two products: one step squares the singular values'
        # spread only once, which the fp32 QR of the result takes.
        V = torch.linalg.qr((D16.T @ (D16 @ V.to(torch.bfloat16))).float()).Q
    return V


def _lowrank_change(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    """``||Ua Sa Va^T - Ub Sb Vb^T||_F / ||Ub Sb Vb^T||_F`` via small Gram matrices (float64)."""
    ua, sa, va = (t.double() for t in a)
    ub, sb, vb = (t.double() for t in b)
    left = torch.cat([ua * sa, -(ub * sb)], dim=1)
    right = torch.cat([va, vb], dim=1)
    diff = float(((left.T @ left) * (right.T @ right)).sum().clamp(min=0.0).sqrt())
    return diff / max(float(sb.square().sum().sqrt()), 1e-300)


def top_svd(D: torch.Tensor, rank: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Top-`rank` singular triplets ``(U, S, Vh)`` of the dense matrix `D` [m, n].

    The solver of the pruning forms before `randomized_svd` (kept as the benchmark's reference):
    block subspace iteration with `block` columns (at least `rank`), started from a Gaussian block
    drawn from a private generator (fixed seed: results never depend on, nor disturb, torch's global
    RNG). After each step the rank-k product is compared with the previous one; with the observed
    contraction rate rho the remaining error is about ``change * rho / (1 - rho)``. It stops below
    `SUBSPACE_TOLERANCE` and falls back to ``torch.linalg.svd(full_matrices=False)`` when the block is not
    much smaller than the matrix (no gain) or after `MAX_ITERATIONS` (a flat spectrum).
    """
    m, n = D.shape
    small = min(m, n)
    q = min(max(block, rank), small)
    if 4 * q > small:
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank], "thin-svd"
    gen = torch.Generator(device=D.device).manual_seed(0)
    omega = torch.randn(n, q, generator=gen, dtype=D.dtype, device=D.device)
    Q = torch.linalg.qr(D @ omega).Q
    previous, last_change = None, None
    for step in range(MAX_ITERATIONS):
        Z = D.T @ Q  # = (Q^T D)^T: the Rayleigh-Ritz matrix of this block, at no extra cost
        Ub, S, Vh = torch.linalg.svd(Z.T, full_matrices=False)
        current = (Q @ Ub[:, :rank], S[:rank], Vh[:rank].T)
        if previous is not None:
            change = _lowrank_change(previous, current)
            verdict = _judge(change, last_change, step)
            if verdict == "converged":
                U, S, V = current
                return U, S, V.T, "subspace-iteration"
            if verdict == "too slow":
                break
            last_change = change
        previous = current
        Q = torch.linalg.qr(D @ torch.linalg.qr(Z).Q).Q
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank], "thin-svd (subspace iteration too slow)"


def _judge(change: float, last_change: float | None, step: int) -> str:
    """``converged``, ``too slow`` or ``continue`` for one subspace-iteration step."""
    if change <= SUBSPACE_TOLERANCE / 5:
        return "converged"
    if not last_change:
        return "continue"
    rate = change / last_change
    if rate >= 0.9:
        return "too slow"
    if change * rate / (1.0 - rate) <= SUBSPACE_TOLERANCE:
        return "converged"
    # Give up as soon as the observed rate cannot reach the tolerance within the budget: the thin
    # SVD is then cheaper than the iterations still to come.
    needed = math.log(SUBSPACE_TOLERANCE * (1.0 - rate) / (change * rate)) / math.log(rate)
    return "too slow" if step + needed > MAX_ITERATIONS else "continue"


def full_delta_svd(
    combine: Combine,
    downs: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    coeffs: Sequence[tuple[float, float]],
    rank: int,
    *,
    reference: bool = False,
) -> SvdMerge:
    """The pruning SVD forms: `combine(deltas, weights)` the full deltas, then a top-`rank` SVD.

    `combine` is a method's combination with its options bound (see `merge_methods`); `coeffs`
    holds ``(weight, scale)`` per source. As in peft the scale goes into each delta and the weight
    into the combination (TIES elects signs on the scaled deltas). Random draws: one full delta per
    source, in source order. TIES and magnitude pruning run row chunk by row chunk
    (`merge_ops.combine_products`: the same values, 1.6x faster at SDXL shapes). The SVD is
    `randomized_svd`, started from the sources' row spaces; `reference` runs `top_svd` instead, the
    solver used before (benchmarks compare the two).
    """
    # The scale goes on the small factor (peft scales the product): same delta, one full-size pass less.
    scaled = [u * s for u, (_, s) in zip(ups, coeffs)]
    weights = [w for w, _ in coeffs]
    D = combine_products(combine, scaled, downs, weights)
    if D is None:  # a combination that needs the whole deltas (DARE's draws)
        D = combine([u @ a for u, a in zip(scaled, downs)], weights)
    k = min(rank, *D.shape)
    block = max(k, sum(a.shape[0] for a in downs)) + OVERSAMPLE
    if reference:
        top = TopSvd(*top_svd(D, k, block))
    else:
        top = randomized_svd(D, k, block, torch.cat(list(downs), dim=0).T)
    total = float(torch.linalg.vector_norm(D)) ** 2
    down, up = _truncate(top.U, top.S, top.Vh, k)
    return SvdMerge(down, up, float(top.S.double().square().sum()), total, top.solver, top.bound)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    if values.numel() <= _QUANTILE_LIMIT:
        return torch.quantile(values, q)
    # torch.quantile's "linear" rule, by selection: position q * (n - 1) between two order statistics.
    pos = q * (values.numel() - 1)
    lo = torch.kthvalue(values, math.floor(pos) + 1).values
    hi = torch.kthvalue(values, math.ceil(pos) + 1).values
    return torch.lerp(lo, hi, pos - math.floor(pos))


def clamp(merged: SvdMerge, quantile: float) -> SvdMerge:
    """peft's ``svd_clamp``: clamp up and down to ``[-h, h]``, h = the `quantile` of all their entries."""
    high = _quantile(torch.cat([merged.up.flatten(), merged.down.flatten()]), quantile)
    low = -high
    return SvdMerge(merged.down.clamp(low, high), merged.up.clamp(low, high), merged.kept_energy,
                    merged.total_energy, merged.solver, merged.bound)
