"""Merge LoRAs into one, with the maths of peft's ``add_weighted_adapter``, for every combination type.

Works on per-module low-rank factors, independent of file formats: a source LoRA's module is a
`Factors` (``down`` = A ``[r, in]`` or conv ``[r, in, kh, kw]``, ``up`` = B ``[out, r]`` or
``[out, r, 1, 1]``, ``scale`` = alpha / r). `merge_module` merges one module, `merge_loras` walks
many (validating all of them first, with cooperative interrupt and progress callbacks) and returns
the merged factors plus a `MergeReport`.

Methods and their options are declarations in `merge_methods` (`REGISTRY`, `MergeOptions`): peft's
``cat`` and ``svd`` are exact / best rank-k; ``linear``, ``ties``, ``dare_linear``, ``dare_ties``,
``magnitude_prune`` combine A's and B's separately (equal ranks only); ``ties_svd``,
``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` prune full deltas and truncate by
SVD; ``breadcrumbs_svd`` (Model Breadcrumbs, not in peft) likewise. This module drives them by
family. The maths lives in `merge_factors` (cat and factor-wise), `merge_svd` (SVD forms) and
`merge_ops` (pruning, sign election, each method's combination).

What matches peft, and where we differ on purpose:

- A merged module's alpha equals its rank (scale 1), as peft's new adapter (``lora_alpha = r``).
- A module absent from some LoRAs merges the LoRAs that have it, with their weights (peft skips
  absent adapters per layer). ``cat`` then has rank = sum of the present ranks; peft pads to the
  sum of all adapters' ranks with zero rows/columns: same delta, fewer bytes.
- SVD forms return rank ``min(svd_rank, matrix rank bound)``: for ``svd`` at most the sum of the
  source ranks (peft's extra columns there are rounding noise), never more than ``min(out, in)``.
- Default ``svd_rank`` in `merge_loras` is the largest rank of any source module (peft: the
  largest configured r); `merge_module` alone defaults to the largest rank among its factors.
- Merging a single LoRA always uses ``linear``, whatever the method (peft's rule).
- Equal ranks are checked per module (peft checks the adapters' configured r). Different ranks are
  refused for the factor-wise methods, naming the module, the ranks and the methods that accept them
  (cat and every SVD form). Zero-padding the smaller factors would run, and would equal peft on the
  padded LoRA (same delta), but the result would not mean anything: the cross terms ``B_i A_j`` pair
  component k of one LoRA with component k of another, an arbitrary match that padding extends by
  an arbitrary choice of where the zeros go; and magnitude pruning keeps ``int(density * numel)``
  entries counting the padding, so more of the real entries survive than `density` says.
- DARE draws from a per-module ``torch.Generator`` seeded from ``(seed, module path)``, so results do
  not depend on what ran before. ``seed=None`` draws from torch's global RNG in peft's order (modules
  as given, then per module all A's then all B's, or one full delta per source), to reproduce peft.
- Everything runs in float32 (bf16/fp16 inputs are upcast: CPU QR/SVD do not exist for bf16) and the
  merged factors stay float32; casting is the writer's job.

Each merge reports its distance from the exact weighted sum of deltas ``sum_i w_i s_i B_i A_i``
(per module and per component) and, for SVD forms, the energy kept by truncation, computed from
small Gram matrices without forming a full-size delta.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import statistics
import time
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch

from .canonical import COMPONENTS
from .errors import LoRAError
from .merge_factors import cat, factorwise
from .merge_methods import (  # noqa: F401 - the method tables are part of this module's API
    ANY_RANK_METHODS,
    CAT,
    EQUAL_RANK_METHODS,
    FACTORWISE,
    METHODS,
    OPTIONS,
    PEFT_METHODS,
    REGISTRY,
    STACKED_SVD,
    SVD_METHODS,
    MergeMethod,
    MergeOptions,
    combinations,
)
from .merge_svd import FALLBACK, SvdMerge, clamp, full_delta_svd, stacked_svd

combinations()  # check every combination's signature against its declaration now, not at the first merge


class MergeError(LoRAError):
    """A merge that cannot run as asked; ``method`` names the combination type."""

    def __init__(self, message: str, *, method: str | None = None, **kwargs):
        self.method = method
        if kwargs.get("fix") and not message.endswith("."):
            message += "."
        super().__init__(message, **kwargs)


@dataclass(frozen=True, eq=False)
class Factors:
    """One source LoRA's factors for one module: ``delta = scale * up @ down``.

    ``down`` (A) is ``[r, in]`` or ``[r, in, kh, kw]`` (LoCon conv), ``up`` (B) is ``[out, r]`` or
    ``[out, r, 1, 1]``; ``scale`` is alpha / r (alpha / sqrt(r) for rsLoRA). Any float dtype.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @classmethod
    def from_alpha(cls, down: torch.Tensor, up: torch.Tensor, alpha: float) -> "Factors":
        """Factors with ``scale = alpha / rank``."""
        return cls(down, up, alpha / down.shape[0])

    @property
    def rank(self) -> int:
        """Inner dimension r."""
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight the module changes: (out, in) or (out, in, kh, kw)."""
        return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))


@dataclass(frozen=True)
class ModuleReport:
    """How one merged module relates to the exact weighted sum ``T = sum_i w_i s_i B_i A_i``.

    ``method`` is the method applied (``linear`` when a single LoRA is merged); ``sources`` how many
    LoRAs have the module; ``target_norm`` = ||T||_F; ``error`` = ||merged - T||_F; ``rel_error`` =
    error / ||T|| (0 when both are 0, inf when only T is). SVD forms: ``energy_kept`` = kept sum of
    squared singular values / total (``decomposed_energy``, the squared Frobenius norm of the matrix
    they decomposed: T itself for ``svd``, the pruned combination for the pruning forms), and
    ``solver``, how the SVD was computed. ``svd_bound`` (randomized SVD only; None where the SVD was
    exact up to float32 rounding) is the certified upper bound of the relative distance between the
    merged delta and the exact best rank-k approximation of the decomposed matrix, which is peft's
    result up to its own rounding (see `lora.merge_svd.randomized_svd`).
    """

    path: str
    component: str
    method: str
    sources: int
    rank: int
    target_norm: float
    error: float
    rel_error: float
    energy_kept: float | None = None
    decomposed_energy: float | None = None
    solver: str | None = None
    svd_bound: float | None = None


@dataclass(frozen=True, eq=False)
class MergedModule:
    """A merged module: float32 ``down`` [rank, in(, kh, kw)] and ``up`` [out, rank(, 1, 1)].

    The scale is 1 (``alpha == rank``), as for peft's merged adapter.
    """

    down: torch.Tensor
    up: torch.Tensor
    rank: int
    report: ModuleReport

    @property
    def alpha(self) -> float:
        """alpha = rank, so ``delta = up @ down``."""
        return float(self.rank)


@dataclass(frozen=True)
class ComponentReport:
    """Summary over one component's modules.

    ``rel_error`` is the aggregate ``sqrt(sum error^2 / sum ||T||^2)``; ``max_rel_error`` and
    ``median_rel_error`` are over modules; ``energy_kept`` (SVD forms) is sum kept / sum total.
    Pruning SVD forms: ``max_svd_bound`` is the largest `ModuleReport.svd_bound` (None when no
    module used the randomized SVD) and ``svd_fallbacks`` counts the modules where it could not
    certify its result and the exact thin SVD ran instead.
    """

    component: str
    modules: int
    rel_error: float
    max_rel_error: float
    median_rel_error: float
    energy_kept: float | None
    max_svd_bound: float | None = None
    svd_fallbacks: int = 0


@dataclass(frozen=True)
class MergeReport:
    """What a `merge_loras` call did: parameters, per-module and per-component numbers, time."""

    method: str
    method_applied: str
    weights: tuple[float, ...]
    parameters: Mapping[str, object]
    modules: tuple[ModuleReport, ...]
    components: Mapping[str, ComponentReport]
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0

    def summary(self) -> str:
        """A few human-readable lines (one per component)."""
        head = f"merge {self.method}"
        if self.method_applied != self.method:
            head += f" (applied as {self.method_applied}: a single LoRA)"
        lines = [f"{head}: {len(self.modules)} modules in {self.seconds:.2f} s"]
        for c in self.components.values():
            line = (f"  {c.component}: {c.modules} modules, relative error {c.rel_error:.3g} "
                    f"(median {c.median_rel_error:.3g}, max {c.max_rel_error:.3g})")
            if c.energy_kept is not None:
                line += f", SVD energy kept {c.energy_kept:.4f}"
            if c.max_svd_bound is not None or c.svd_fallbacks:
                bound = "" if c.max_svd_bound is None else f"within {c.max_svd_bound:.2g} of the exact SVD's (certified)"
                line += f"; randomized SVD {bound}"
                if c.svd_fallbacks:
                    line += f"{', ' if bound else ''}{c.svd_fallbacks} module(s) by the exact SVD (not certified)"
            lines.append(line)
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} module(s) present in no LoRA")
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class MergeResult:
    """`merge_loras` output: merged modules by path (input order) and the report."""

    modules: Mapping[str, MergedModule]
    report: MergeReport


# --- validation ---------------------------------------------------------------------------------


def check_parameters(method: str, n_loras: int, weights: Sequence[float], options: MergeOptions) -> MergeMethod:
    """Validate method, weights and the options the method reads; return the method to apply
    (``linear`` for a single LoRA, as peft)."""
    if method not in REGISTRY:
        raise MergeError(f"unknown merge method {method!r}; valid methods: {', '.join(METHODS)}",
                         method=method, value=method, limit=METHODS)
    if n_loras < 1:
        raise MergeError(f"merge {method}: no LoRA given", method=method, value=0, limit=">= 1")
    if len(weights) != n_loras:
        raise MergeError(f"merge {method}: {len(weights)} weight(s) for {n_loras} LoRA(s)", method=method,
                         value=len(weights), limit=n_loras, fix="give one weight per LoRA")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise MergeError(f"merge {method}: weight {i} is {w!r}, not a finite number", method=method,
                             key=f"weights[{i}]", value=w)
    if not isinstance(options, MergeOptions):
        raise MergeError(f"merge {method}: options {options!r} is not a MergeOptions", method=method,
                         key="options", value=options, fix="pass MergeOptions(density=0.5, ...)")
    applied = REGISTRY["linear" if n_loras == 1 else method]
    for name in applied.options:
        value = getattr(options, name)
        problem = OPTIONS[name].problem(value)
        if problem is not None:
            message, fix = problem
            raise MergeError(f"merge {method}: {message}", method=method, key=name, value=value,
                             limit=OPTIONS[name].limit, fix=fix)
    return applied


def check_module(path: str, method: str, factors: Sequence[Factors | None]) -> None:
    """Validate one module's factors: shapes, agreement across LoRAs, finite scales (not ranks)."""
    present = [(i, f) for i, f in enumerate(factors) if f is not None]
    first_shape = None
    for i, f in present:
        where = f"merge {method}: module {path!r}, LoRA {i}"
        if not isinstance(f, Factors):
            raise MergeError(f"{where}: expected Factors or None, got {type(f).__name__}", method=method, key=path)
        d, u = f.down, f.up
        if d.ndim not in (2, 4) or u.ndim != d.ndim:
            raise MergeError(f"{where}: down {tuple(d.shape)} and up {tuple(u.shape)} must both be 2-D (linear) "
                             "or both 4-D (conv)", method=method, key=path, value=(tuple(d.shape), tuple(u.shape)))
        if u.shape[1] != d.shape[0]:
            raise MergeError(f"{where}: up has rank {u.shape[1]} {tuple(u.shape)}, down has rank {d.shape[0]} "
                             f"{tuple(d.shape)}", method=method, key=path, value=u.shape[1], limit=d.shape[0])
        if u.ndim == 4 and tuple(u.shape[2:]) != (1, 1):
            raise MergeError(f"{where}: conv up must be 1x1, got kernel {tuple(u.shape[2:])}", method=method,
                             key=path, value=tuple(u.shape[2:]), limit=(1, 1))
        if not d.is_floating_point() or not u.is_floating_point():
            raise MergeError(f"{where}: factors must be floating point, got {d.dtype} / {u.dtype}", method=method,
                             key=path, value=(d.dtype, u.dtype))
        if not math.isfinite(f.scale):
            raise MergeError(f"{where}: scale {f.scale!r} is not finite", method=method, key=path, value=f.scale)
        if first_shape is None:
            first_shape = (i, f.shape)
        elif f.shape != first_shape[1]:
            raise MergeError(f"merge {method}: module {path!r}: LoRA {i} targets a weight of shape {f.shape}, "
                             f"LoRA {first_shape[0]} one of {first_shape[1]}", method=method, key=path,
                             value=f.shape, limit=first_shape[1], fix="these LoRAs were made for different models")


def _unequal_ranks(method: MergeMethod, factors: Sequence[Factors | None]) -> dict[int, int] | None:
    """The ranks by LoRA index when `method` needs equal ranks and they differ, else None."""
    if not method.equal_ranks:
        return None
    ranks = {i: f.rank for i, f in enumerate(factors) if f is not None}
    return ranks if len(set(ranks.values())) > 1 else None


def _rank_error(method: str, offenders: list[tuple[str, dict[int, int]]]) -> MergeError:
    path, ranks = offenders[0]
    listed = ", ".join(f"LoRA {i}: rank {r}" for i, r in ranks.items())
    more = f" (and {len(offenders) - 1} more module(s))" if len(offenders) > 1 else ""
    return MergeError(
        f"merge {method}: module {path!r} has different ranks ({listed}){more}; {method} combines A's and B's "
        f"element by element and needs equal ranks. Methods that accept different ranks: {', '.join(ANY_RANK_METHODS)}",
        method=method, key=path, value=ranks, limit="equal ranks",
        fix="use cat (exact) or svd (best rank-k), or the _svd form of this method",
    )


# --- one module ---------------------------------------------------------------------------------


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.float().flatten(1)


def _gram_norms(ups, downs, coeffs, up, down, dtype) -> tuple[float, float]:
    left = torch.cat([u.to(dtype) * c for u, c in zip(ups, coeffs)] + [-up.to(dtype)], dim=1)
    right = torch.cat([d.to(dtype) for d in downs] + [down.to(dtype)], dim=0)
    gram = (left.T @ left) * (right @ right.T)
    r = sum(d.shape[0] for d in downs)
    target_sq = float(gram[:r, :r].double().sum())
    error_sq = float(gram.double().sum())
    return math.sqrt(max(target_sq, 0.0)), math.sqrt(max(error_sq, 0.0))


def lowrank_distance(
    ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor], coeffs: Sequence[float], up: torch.Tensor,
    down: torch.Tensor,
) -> tuple[float, float]:
    """``(||T||_F, ||up @ down - T||_F)`` for ``T = sum_i coeffs[i] * ups[i] @ downs[i]``, no full-size matrix.

    Factors are 2-D (``[out, r]`` and ``[r, in]``; flatten conv factors first).

    ``||L @ R||_F^2 = sum((L^T L) * (R R^T))`` for the stacks ``L = [c_1 B_1, ..., -up]`` and
    ``R = [A_1; ...; down]``: (out + in) * rank^2 work. The difference cancels inside that sum, so
    float32 Grams put a floor of ~3e-4 under a relative error: float32 is used first and the sum is
    redone in float64 when the error is below 1e-2 of the target (float64 costs about 3x).
    """
    norm, error = _gram_norms(ups, downs, coeffs, up, down, torch.float32)
    if error < 1e-2 * norm or norm == 0:
        norm, error = _gram_norms(ups, downs, coeffs, up, down, torch.float64)
    return norm, error


def _cat_distance(ups, downs, coeffs: Sequence[tuple[float, float]], down: torch.Tensor) -> tuple[float, float]:
    """`lowrank_distance` for ``cat``, where up is the sources' B's unchanged and down their scaled A's.

    Then ``merged - T = sum_i B_i E_i`` with ``E_i = w_i s_i A_i - down_i`` (float32 rounding of the
    scaled A's, computed in float64): no cancellation, so float32 Grams of rank-sized stacks suffice.
    """
    up = torch.cat(list(ups), dim=1)
    exact = torch.cat([d.double() * (w * s) for d, (w, s) in zip(downs, coeffs)], dim=0)
    residual = (exact - down.double()).float()
    gram_up = up.T @ up
    norm_sq = float((gram_up * (down @ down.T)).double().sum())
    error_sq = float((gram_up * (residual @ residual.T)).double().sum())
    return math.sqrt(max(norm_sq, 0.0)), math.sqrt(max(error_sq, 0.0))


def _relative(error: float, norm: float) -> float:
    if norm > 0:
        return error / norm
    return 0.0 if error == 0 else math.inf


def _component(path: str, component: str | None) -> str:
    if component is not None:
        return component
    for c in sorted(COMPONENTS, key=len, reverse=True):
        if path.startswith(c + "."):
            return c
    return "model"


def _merge_checked(
    path: str,
    component: str,
    method: MergeMethod,
    factors: Sequence[Factors | None],
    weights: Sequence[float],
    options: MergeOptions,
    generator: torch.Generator | None,
) -> MergedModule:
    applied = method.name
    present = [(f, w) for f, w in zip(factors, weights) if f is not None]
    if not present:
        raise MergeError(f"merge {applied}: module {path!r} is in none of the LoRAs", method=applied, key=path)
    template = present[0][0]
    ups = [_flat(f.up) for f, _ in present]
    downs = [_flat(f.down) for f, _ in present]
    coeffs = [(float(w), float(f.scale)) for f, w in present]
    # peft draws DARE masks in the adapter's own dtype; only the global-RNG (peft-compatible) mode copies that.
    mask_dtypes = [f.down.dtype for f, _ in present] if generator is None else None
    context = dict(generator=generator, mask_dtypes=mask_dtypes)
    energy = decomposed = solver = svd_bound = None
    if method.family is CAT:
        down, up = cat(downs, ups, coeffs)
    elif method.family is FACTORWISE:
        # peft keeps conv factors 4-D here; flattened ones give the same numbers (element-wise maths,
        # pruning over all entries in the same order, draws in the same order).
        down, up = factorwise(method.bind(options, select="topk", **context), downs, ups, coeffs)
    else:
        rank = int(options.svd_rank) if options.svd_rank is not None else max(f.rank for f, _ in present)
        if method.family is STACKED_SVD or method.is_weighted_sum(options):
            merged: SvdMerge = stacked_svd(downs, ups, [w * s for w, s in coeffs], rank)
        else:
            # Full deltas are sums of products: magnitudes practically never tie, so selection keeps topk's entries.
            merged = full_delta_svd(method.bind(options, select="kth", **context), downs, ups, coeffs, rank)
        if options.svd_clamp is not None:
            merged = clamp(merged, options.svd_clamp)
        down, up, solver, svd_bound = merged.down, merged.up, merged.solver, merged.bound
        decomposed = merged.total_energy
        energy = merged.kept_energy / decomposed if decomposed > 0 else 1.0
    if solver == "stacked-qr" and options.svd_clamp is None:
        # Truncating the SVD of T itself: what is cut is exactly the discarded singular values.
        norm = math.sqrt(decomposed)
        error = math.sqrt(max(decomposed - merged.kept_energy, 0.0))
    elif method.family is CAT:
        norm, error = _cat_distance(ups, downs, coeffs, down)
    else:
        norm, error = lowrank_distance(ups, downs, [w * s for w, s in coeffs], up, down)
    rank_out = int(down.shape[0])
    if template.down.ndim == 4:
        down = down.reshape(rank_out, *template.down.shape[1:])
        up = up.reshape(up.shape[0], rank_out, 1, 1)
    report = ModuleReport(path, component, applied, len(present), rank_out, norm, error, _relative(error, norm),
                          energy, decomposed, solver, svd_bound)
    return MergedModule(down.contiguous(), up.contiguous(), rank_out, report)


def merge_module(
    method: str,
    factors: Sequence[Factors | None],
    weights: Sequence[float],
    options: MergeOptions = MergeOptions(),
    *,
    generator: torch.Generator | None = None,
    path: str = "<module>",
    component: str | None = None,
) -> MergedModule:
    """Merge one module's factors from several LoRAs with `method` (one of `METHODS`).

    `factors` has one entry per LoRA (None where that LoRA lacks the module), `weights` one weight
    per LoRA. `options` holds what the method reads (see `MergeOptions`; a pruning method needs
    ``density``); ``svd_rank`` defaults to the largest rank among `factors`; ``seed`` is not read
    here: `generator` drives DARE's random pruning (None: torch's global RNG, as peft). `path` and
    `component` only label errors and the report. Raises `MergeError` for invalid input.
    """
    applied = check_parameters(method, len(factors), weights, options)
    check_module(path, applied.name, factors)
    ranks = _unequal_ranks(applied, factors)
    if ranks:
        raise _rank_error(applied.name, [(path, ranks)])
    return _merge_checked(path, _component(path, component), applied, factors, weights, options, generator)


# --- many modules -------------------------------------------------------------------------------


def module_generator(seed: int, path: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The DARE generator of one module: seeded from (seed, module path), stable across runs and Pythons.

    `device` is where the factors live (a CPU generator cannot drive CUDA draws); the streams of
    different devices differ.
    """
    digest = hashlib.sha256(f"{seed}\0{path}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _summarise(component: str, reports: list[ModuleReport]) -> ComponentReport:
    rel = [r.rel_error for r in reports]
    total_sq = sum(r.target_norm ** 2 for r in reports)
    error_sq = sum(r.error ** 2 for r in reports)
    decomposed = [r for r in reports if r.energy_kept is not None]
    energy = None
    if decomposed:
        total = sum(r.decomposed_energy for r in decomposed)
        energy = sum(r.energy_kept * r.decomposed_energy for r in decomposed) / total if total > 0 else 1.0
    bounds = [r.svd_bound for r in reports if r.svd_bound is not None]
    return ComponentReport(component, len(reports), _relative(math.sqrt(error_sq), math.sqrt(total_sq)),
                           max(rel), statistics.median(rel), energy, max(bounds) if bounds else None,
                           sum(r.solver == FALLBACK for r in reports))


def merge_loras(
    method: str,
    modules: Mapping[str, Sequence[Factors | None]],
    weights: Sequence[float],
    options: MergeOptions = MergeOptions(),
    *,
    component: str | None = None,
    check_interrupt: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge LoRAs module by module: ``modules[path]`` lists each LoRA's `Factors` (None if absent).

    Every module is validated before any is merged (shapes, ranks for the equal-rank methods,
    options), so a refusal costs no merge time. Modules present in no LoRA are skipped (listed in
    the report). ``options.svd_rank`` defaults to the largest rank of any source module, as peft.
    ``options.seed`` seeds DARE per module (see `module_generator`); ``None`` uses torch's global
    RNG in peft's draw order. `component` labels every module (default: the path's prefix, e.g.
    ``unet.``, else "model"). `check_interrupt()` is called before each module and may raise to
    stop; `progress(done, total)` after each. Other parameters as `merge_module`.
    """
    start = time.perf_counter()
    n_loras = len(weights)
    applied = check_parameters(method, n_loras, weights, options)
    rank_offenders: list[tuple[str, dict[int, int]]] = []
    work, skipped = [], []
    max_rank = 0
    for path, factors in modules.items():
        if len(factors) != n_loras:
            raise MergeError(f"merge {method}: module {path!r} lists {len(factors)} LoRA(s), weights {n_loras}",
                             method=method, key=path, value=len(factors), limit=n_loras)
        check_module(path, applied.name, factors)
        ranks = _unequal_ranks(applied, factors)
        if ranks:
            rank_offenders.append((path, ranks))
        if all(f is None for f in factors):
            skipped.append(path)
            continue
        max_rank = max(max_rank, *(f.rank for f in factors if f is not None))
        work.append((path, factors))
    if rank_offenders:
        raise _rank_error(applied.name, rank_offenders)
    rank = int(options.svd_rank) if options.svd_rank is not None else max_rank
    resolved = replace(options, svd_rank=rank)
    merged: dict[str, MergedModule] = {}
    for i, (path, factors) in enumerate(work):
        if check_interrupt is not None:
            check_interrupt()
        generator = None
        if options.seed is not None and applied.random:
            generator = module_generator(int(options.seed), path, next(f.down.device for f in factors if f is not None))
        merged[path] = _merge_checked(path, _component(path, component), applied, factors, weights, resolved,
                                      generator)
        if progress is not None:
            progress(i + 1, len(work))
    reports = [m.report for m in merged.values()]
    by_component: dict[str, list[ModuleReport]] = {}
    for r in reports:
        by_component.setdefault(r.component, []).append(r)
    parameters = options.parameters(REGISTRY[method]) | {"svd_rank": rank if applied.svd else None}
    report = MergeReport(
        method=method,
        method_applied=applied.name,
        weights=tuple(float(w) for w in weights),
        parameters=MappingProxyType(parameters),
        modules=tuple(reports),
        components=MappingProxyType({c: _summarise(c, rs) for c, rs in by_component.items()}),
        skipped=tuple(skipped),
        seconds=time.perf_counter() - start,
    )
    return MergeResult(MappingProxyType(merged), report)
