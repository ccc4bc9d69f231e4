"""The one in-memory LoRA value every reader produces and every writer, merger and applier consumes.

A `LoRA` holds, per component (`COMPONENTS`: "unet" or "transformer", and the text encoders) and
per module (the diffusers module path, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``
or Flux's ``single_transformer_blocks.7.proj_mlp``), one
module value:

- `LoRAModule`: the classic pair, ``delta = alpha / rank * up @ down`` (LoCon conv layers keep
  their 4-D ``down`` with the kernel shape and a 1x1 ``up``);
- `LoHaModule`: LyCORIS LoHa, ``delta = alpha / rank * (w1a @ w1b) * (w2a @ w2b)`` (Tucker form
  with ``t1``/``t2`` for conv layers);
- `LoKrModule`: LyCORIS LoKr, ``delta = scale * kron(w1, w2)`` with either factor full or
  decomposed (``w1a @ w1b``, ``w2a @ w2b`` or Tucker ``t2``), or selected ``rows`` of that product
  (the part of a LoKr on a fused Flux / SD3 weight that lands on one diffusers module).

`delta(module)` turns any of them into the full-rank weight delta, so blending, fusing and merging
work on all kinds alike.

Text-encoder module paths never carry the ``text_model.`` prefix: transformers 5 flattened
CLIPTextModel (no ``.text_model`` submodule) but CLIPTextModelWithProjection (SDXL's second
encoder) still has it, so the canonical path is the one without it and `keymap.te_model_path`
adds it back where a live model needs it.

Values are immutable by convention: the dataclasses are frozen and the mappings read-only, and the
tensors are the ones the file was read into (same dtype, never copied). Never modify them in place:
derive a new value instead (`dataclasses.replace`, `derived_fingerprint`).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar, Iterator, Mapping, Sequence, Union

import torch

from .errors import LoRAFormatError

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
"""Components a LoRA can touch, in the order files and reports list them: diffusers' pipeline
attribute names (SD1.5/SDXL: unet and one or two CLIP encoders; Flux: transformer, CLIP-L, T5;
SD3.5: transformer, CLIP-L, CLIP-G, T5)."""
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""The text-encoder components (their module paths are canonicalised without ``text_model.``)."""


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_alpha(alpha: float, key: str) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise LoRAFormatError(f"module {key!r}: alpha {alpha!r} is not a finite number", key=key, value=alpha)


@dataclass(frozen=True, eq=False)
class LoRAModule:
    """A low-rank pair: ``delta = alpha / rank * up @ down``.

    ``down`` (A) is ``[rank, in]`` for linear layers and ``[rank, in, kh, kw]`` for conv layers
    (LoCon), ``up`` (B) is ``[out, rank]`` or ``[out, rank, 1, 1]``. ``key`` is the module's name in
    the file it came from (for error messages).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    key: str = ""
    kind: ClassVar[str] = "lora"

    def __post_init__(self):
        key = self.key or "<module>"
        if self.down.ndim not in (2, 4) or self.up.ndim != self.down.ndim:
            raise LoRAFormatError(
                f"module {key!r}: down {tuple(self.down.shape)} and up {tuple(self.up.shape)} must both be "
                "2-D (linear) or both 4-D (conv)",
                key=key,
                value=(_shape(self.down), _shape(self.up)),
            )
        if self.up.shape[1] != self.down.shape[0]:
            raise LoRAFormatError(
                f"module {key!r}: up/down ranks disagree: down (A) has rank {self.down.shape[0]} "
                f"{tuple(self.down.shape)}, up (B) has rank {self.up.shape[1]} {tuple(self.up.shape)}",
                key=key,
                value=self.up.shape[1],
                limit=self.down.shape[0],
            )
        if self.up.ndim == 4 and tuple(self.up.shape[2:]) != (1, 1):
            raise LoRAFormatError(
                f"module {key!r}: conv up (B) must be 1x1, got kernel {tuple(self.up.shape[2:])}",
                key=key,
                value=tuple(self.up.shape[2:]),
                limit=(1, 1),
            )
        _check_alpha(self.alpha, key)

    @property
    def rank(self) -> int:
        """Inner dimension r."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank: the factor the product up @ down is multiplied by."""
        return self.alpha / self.rank

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """Conv kernel (kh, kw) of the target layer, () for linear layers."""
        return tuple(self.down.shape[2:])

    @property
    def is_conv(self) -> bool:
        """True for LoCon conv layers."""
        return self.down.ndim == 4

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight this module changes: (out, in) or (out, in, kh, kw)."""
        return (int(self.up.shape[0]), int(self.down.shape[1]), *self.kernel_size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return _nbytes(self.down, self.up)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by role name."""
        return {"down": self.down, "up": self.up}


@dataclass(frozen=True, eq=False)
class LoHaModule:
    """LyCORIS LoHa: ``delta = alpha / rank * (w1a @ w1b) * (w2a @ w2b)`` (element-wise product).

    Plain form: ``w1a``/``w2a`` ``[out, rank]``, ``w1b``/``w2b`` ``[rank, in * kh * kw]``. Tucker form
    (conv layers, ``t1``/``t2`` ``[rank, rank, kh, kw]``): ``w1a``/``w2a`` ``[rank, out]``,
    ``w1b``/``w2b`` ``[rank, in]``. ``shape`` is the target weight shape when known (a plain-form
    conv delta cannot tell its kernel from the factors alone); `delta` takes it as an argument too.
    """

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    shape_hint: tuple[int, ...] | None = None
    key: str = ""
    kind: ClassVar[str] = "loha"

    def __post_init__(self):
        key = self.key or "<module>"
        ranks = {"hada_w1_b": self.w1b.shape[0], "hada_w2_b": self.w2b.shape[0]}
        if self.t1 is None:
            ranks.update(hada_w1_a=self.w1a.shape[1], hada_w2_a=self.w2a.shape[1])
        else:
            if self.t2 is None:
                raise LoRAFormatError(f"module {key!r}: hada_t1 without hada_t2", key=key)
            ranks.update(hada_w1_a=self.w1a.shape[0], hada_w2_a=self.w2a.shape[0], hada_t1=self.t1.shape[0])
        if len(set(ranks.values())) > 1:
            raise LoRAFormatError(
                f"module {key!r}: LoHa ranks disagree: {ranks}", key=key, value=ranks, limit=self.w1b.shape[0]
            )
        _check_alpha(self.alpha, key)

    @property
    def rank(self) -> int:
        """LoHa dimension (rows of hada_w1_b)."""
        return int(self.w1b.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank."""
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        """True when the target is known to be a conv layer."""
        return self.t1 is not None or (self.shape_hint is not None and len(self.shape_hint) == 4)

    @property
    def shape(self) -> tuple[int, ...]:
        """Target weight shape: ``shape_hint`` if known, else (out, in) / (out, in*kh*kw) / Tucker shape."""
        if self.shape_hint is not None:
            return tuple(self.shape_hint)
        if self.t1 is not None:
            return (int(self.w1a.shape[1]), int(self.w1b.shape[1]), *self.t1.shape[2:])
        return (int(self.w1a.shape[0]), int(self.w1b.shape[1]))

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return _nbytes(self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by their LyCORIS key suffix (hada_w1_a, ...)."""
        out = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        if self.t1 is not None:
            out.update(hada_t1=self.t1, hada_t2=self.t2)
        return out


@dataclass(frozen=True, eq=False)
class LoKrModule:
    """LyCORIS LoKr: ``delta = scale * kron(w1, w2)``.

    ``w1`` is either given full (``lokr_w1``) or as ``w1a @ w1b``; ``w2`` full, as ``w2a @ w2b``, or
    in Tucker form with ``t2``. The scale is ``alpha / rank`` where rank is the inner dimension of the
    decomposed factor (w2's if decomposed, else w1's); with both factors full it is 1, exactly as
    LyCORIS, ComfyUI and A1111 apply it.

    ``rows`` (row ranges ``(start, stop)`` of the full product, concatenated) makes the delta those
    rows of ``scale * kron(w1, w2)`` only: the part of a LoKr on a fused original-layout weight (Flux's
    ``linear1``) whose Kronecker blocks straddle the part boundaries (`dit_keys.split_module`). The
    factors stay the fused module's (shared by every part, never a dense delta per part); None: all rows.
    """

    alpha: float
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    shape_hint: tuple[int, ...] | None = None
    key: str = ""
    rows: tuple[tuple[int, int], ...] | None = None
    kind: ClassVar[str] = "lokr"

    def __post_init__(self):
        key = self.key or "<module>"
        if (self.w1 is None) == (self.w1a is None or self.w1b is None):
            raise LoRAFormatError(
                f"module {key!r}: LoKr needs exactly one of lokr_w1 or lokr_w1_a + lokr_w1_b", key=key
            )
        if (self.w2 is None) == (self.w2a is None or self.w2b is None):
            raise LoRAFormatError(
                f"module {key!r}: LoKr needs exactly one of lokr_w2 or lokr_w2_a + lokr_w2_b", key=key
            )
        if self.w1 is None and self.w1a.shape[1] != self.w1b.shape[0]:
            raise LoRAFormatError(
                f"module {key!r}: LoKr ranks disagree: lokr_w1_a has rank {self.w1a.shape[1]}, "
                f"lokr_w1_b has rank {self.w1b.shape[0]}",
                key=key,
                value=self.w1a.shape[1],
                limit=self.w1b.shape[0],
            )
        if self.w2 is None:
            a_rank = self.w2a.shape[0] if self.t2 is not None else self.w2a.shape[1]
            if a_rank != self.w2b.shape[0]:
                raise LoRAFormatError(
                    f"module {key!r}: LoKr ranks disagree: lokr_w2_a has rank {a_rank}, "
                    f"lokr_w2_b has rank {self.w2b.shape[0]}",
                    key=key,
                    value=a_rank,
                    limit=self.w2b.shape[0],
                )
        _check_alpha(self.alpha, key)
        if self.rows is not None:
            height = self.kron_rows
            if not self.rows or any(not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b <= height)
                                    for a, b in self.rows):  # fmt: skip
                raise LoRAFormatError(
                    f"module {key!r}: LoKr rows {list(self.rows)} are not ranges within its Kronecker "
                    f"product's {height} rows",
                    key=key,
                    value=list(self.rows),
                    limit=height,
                )

    @property
    def rank(self) -> int | None:
        """Inner dimension of the decomposed factor (w2's first), None when both factors are full."""
        if self.w2 is None:
            return int(self.w2b.shape[0])
        if self.w1 is None:
            return int(self.w1b.shape[0])
        return None

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 when both factors are full."""
        return 1.0 if self.rank is None else self.alpha / self.rank

    def _factor_shapes(self) -> tuple[tuple[int, int], tuple[int, ...]]:
        w1 = _shape(self.w1) or (self.w1a.shape[0], self.w1b.shape[1])
        if self.w2 is not None:
            w2 = _shape(self.w2)
        elif self.t2 is not None:
            w2 = (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        else:
            w2 = (self.w2a.shape[0], self.w2b.shape[1])
        return (int(w1[0]), int(w1[1])), tuple(int(d) for d in w2)

    @property
    def kron_rows(self) -> int:
        """Rows of the full Kronecker product (``rows`` selects among them)."""
        (a, _), w2 = self._factor_shapes()
        return a * w2[0]

    @property
    def is_conv(self) -> bool:
        """True when the target is known to be a conv layer."""
        return len(self.shape) == 4

    @property
    def shape(self) -> tuple[int, ...]:
        """Target weight shape: ``shape_hint`` if known, else the Kronecker product's shape (its
        selected ``rows``)."""
        if self.shape_hint is not None:
            return tuple(self.shape_hint)
        (a, b), w2 = self._factor_shapes()
        out = a * w2[0] if self.rows is None else sum(stop - start for start, stop in self.rows)
        return (out, b * w2[1], *w2[2:])

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return _nbytes(self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by their LyCORIS key suffix (lokr_w1, ...), only those present."""
        named = {
            "lokr_w1": self.w1,
            "lokr_w1_a": self.w1a,
            "lokr_w1_b": self.w1b,
            "lokr_w2": self.w2,
            "lokr_w2_a": self.w2a,
            "lokr_w2_b": self.w2b,
            "lokr_t2": self.t2,
        }
        return {k: v for k, v in named.items() if v is not None}


Module = Union[LoRAModule, LoHaModule, LoKrModule]
MODULE_KINDS = ("lora", "loha", "lokr")


def _tucker(t: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    # LyCORIS' Tucker rebuild (same contraction as LyCORIS, ComfyUI and peft): [out, in, kh, kw].
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def _kron_rows(w1: torch.Tensor, w2: torch.Tensor, rows: Sequence[tuple[int, int]] | None) -> torch.Tensor:
    """``kron(w1, w2)``, or its `rows` concatenated, from only the rows of w1 they touch (row r of
    the product is row ``r // k`` of w1 times row ``r % k`` of w2, k = w2's height): each element is
    the same single product ``w1[i, j] * w2[p, q]`` as in the full product, so the rows are bit for
    bit those of the full product, at the cost of at most two extra w2-high blocks per range."""
    if w2.ndim == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)
    # kron views its inputs internally and fails on non-contiguous ones (Tucker einsum output)
    w1, w2 = w1.contiguous(), w2.contiguous()
    if rows is None:
        return torch.kron(w1, w2)
    k = w2.shape[0]
    parts = []
    for start, stop in rows:
        lo, hi = start // k, -(-stop // k)
        parts.append(torch.kron(w1[lo:hi].contiguous(), w2)[start - lo * k : stop - lo * k])
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def delta(module: Module, shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full-rank weight delta of `module`, scale included, as a new tensor of `dtype`.

    `shape` is the target weight's shape (needed to give plain-form LoHa/LoKr conv deltas their
    kernel; defaults to ``module.shape``). The maths runs in `dtype` (float32 by default: CPU
    matmuls in bf16 lose precision and some ops are not implemented for it).
    """
    target = tuple(shape) if shape is not None else module.shape

    def f(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype)

    if isinstance(module, LoRAModule):
        flat = f(module.up).flatten(1) @ f(module.down).flatten(1)
        out = flat * module.scale
    elif isinstance(module, LoHaModule):
        if module.t1 is not None:
            out = _tucker(f(module.t1), f(module.w1b), f(module.w1a)) * _tucker(f(module.t2), f(module.w2b), f(module.w2a))
        else:
            out = (f(module.w1a) @ f(module.w1b)) * (f(module.w2a) @ f(module.w2b))
        out = out * module.scale
    elif isinstance(module, LoKrModule):
        w1 = f(module.w1) if module.w1 is not None else f(module.w1a) @ f(module.w1b)
        if module.w2 is not None:
            w2 = f(module.w2)
        elif module.t2 is not None:
            w2 = _tucker(f(module.t2), f(module.w2b), f(module.w2a))
        else:
            w2 = f(module.w2a) @ f(module.w2b)
        out = _kron_rows(w1, w2, module.rows) * module.scale
    else:
        raise TypeError(f"delta() takes a LoRAModule, LoHaModule or LoKrModule, not {type(module).__name__}")
    if out.numel() != math.prod(target):
        raise LoRAFormatError(
            f"module {module.key or '<module>'!r} ({module.kind}): its delta has {out.numel()} elements "
            f"{tuple(out.shape)}, the target weight {target} has {math.prod(target)}",
            key=module.key,
            value=tuple(out.shape),
            limit=target,
        )
    return out.reshape(target)


def _split(t: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    # t (fp32) as a sum of `dtype` parts: the rounded value, then what rounding lost (left out when
    # nothing was lost, e.g. a bf16 factor times a power of two). Two bf16 parts carry 16 bits of
    # the 24: the pair's product is within 2^-16 of the fp32 product, far below a bf16 weight's step.
    high = t.to(dtype)
    low = (t - high.float()).to(dtype)
    return [high, low] if bool(low.any()) else [high]


def stacked_factors(terms: Sequence[tuple[float, LoRAModule]], dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up, down, scale)`` with ``scale * (up @ down) == sum(coeff * delta(module))`` over `terms`
    (``(coeff, LoRAModule)`` pairs), flattened to 2-D ``[out, k]`` and ``[k, in * kh * kw]``: one
    matmul for every LoRA of a layer (``addmm(..., alpha=scale)``).

    In float32 (the default) the coefficients and ``alpha / rank`` are folded into the up factors
    and ``scale`` is 1.0: the fp32 maths of `delta`, up to the order of roundings. In bfloat16
    ``scale`` is the folded coefficient of the LoRA with the largest rank, which the matmul applies
    to its fp32 accumulator, so that LoRA's bf16 factors go in unchanged; the other LoRAs' up factors
    carry their coefficient relative to it, and a scaled fp32 factor is split into a rounded part and
    its remainder (a bf16 matmul accumulates in fp32, and a product of two bf16 values is exact in
    fp32), so the product keeps 16 bits of the fp32 one; ``k`` grows by up to 3x for such a LoRA.
    """
    if dtype == torch.float32:
        ups = [module.up.flatten(1).to(torch.float32) * (coeff * module.scale) for coeff, module in terms]
        downs = [module.down.flatten(1).to(torch.float32) for _coeff, module in terms]
        scale = 1.0
    else:
        # the widest LoRA unsplit: splitting it would cost the most (k grows by its rank)
        scale = max(((coeff * module.scale, module.rank) for coeff, module in terms), key=lambda t: t[1])[0]
        folded = [coeff * module.scale for coeff, module in terms]
        if scale == 0.0 or any(f != 0.0 and not 2.0 ** -32 <= abs(f / scale) <= 2.0 ** 32 for f in folded):
            scale = 1.0  # a zero or extreme ratio could leave bf16's range: each up carries its own coefficient
        ups, downs = [], []
        for f, (_coeff, module) in zip(folded, terms):
            up_parts = _split(module.up.flatten(1).to(torch.float32) * (f / scale), dtype)
            down = module.down.flatten(1)
            down_parts = [down] if down.dtype == dtype else _split(down.to(torch.float32), dtype)
            # (u + u') (d + d') = u d + u' d + u d' (+ u' d', below the precision kept)
            ups += [up_parts[0], *up_parts[1:], *([up_parts[0]] * (len(down_parts) - 1))]
            downs += [down_parts[0], *([down_parts[0]] * (len(up_parts) - 1)), *down_parts[1:]]
    if len(ups) == 1:
        return ups[0], downs[0], scale
    return torch.cat(ups, 1), torch.cat(downs, 0), scale


def _frozen(components: Mapping[str, Mapping[str, Module]]) -> Mapping[str, Mapping[str, Module]]:
    # Sorted paths: the same LoRA read from any file layout lists its modules in the same order.
    return MappingProxyType({c: MappingProxyType(dict(sorted(mods.items()))) for c, mods in components.items()})


@dataclass(frozen=True, eq=False)
class LoRA:
    """A LoRA in canonical form: ``components[component][module_path] -> module`` (paths sorted).

    ``source_format``: how the file named its keys ("diffusers", "peft", "kohya", "kohya-sgm", or
    "derived" for computed values). ``metadata``: the file's string metadata, as read.
    ``fingerprint``: content hash (of the file, from safefile; for derived values a hash of the
    inputs, see `derived_fingerprint`). ``notes``: how the reader interpreted the file (alpha source,
    fixes applied). Equality is identity; compare fingerprints to compare content.
    """

    components: Mapping[str, Mapping[str, Module]]
    source_format: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    path: str | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown:
            raise LoRAFormatError(
                f"unknown component(s) {unknown}; valid components: {', '.join(COMPONENTS)}",
                path=self.path,
                key=unknown[0],
                limit=COMPONENTS,
            )
        ordered = {c: self.components[c] for c in COMPONENTS if self.components.get(c)}
        object.__setattr__(self, "components", _frozen(ordered))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        object.__setattr__(self, "notes", tuple(self.notes))

    def modules(self) -> Iterator[tuple[str, str, Module]]:
        """(component, module_path, module) for every module, components in canonical order."""
        for component, mods in self.components.items():
            for path, module in mods.items():
                yield component, path, module

    @property
    def n_modules(self) -> int:
        """Number of modules over all components."""
        return sum(len(m) for m in self.components.values())

    @property
    def kinds(self) -> tuple[str, ...]:
        """Module kinds present ("lora", "loha", "lokr"), in that order."""
        present = {m.kind for _, _, m in self.modules()}
        return tuple(k for k in MODULE_KINDS if k in present)

    @property
    def algorithm(self) -> str:
        """"lora", "locon" (LoRA with conv layers), "loha", "lokr", or a "+"-joined mix."""
        names = []
        for kind in self.kinds:
            if kind == "lora" and any(m.kind == "lora" and m.is_conv for _, _, m in self.modules()):
                names.append("locon")
            else:
                names.append(kind)
        return "+".join(names) or "empty"

    @property
    def nbytes(self) -> int:
        """Bytes held by all tensors."""
        return sum(m.nbytes for _, _, m in self.modules())

    def __loraloom_parts__(self) -> list[torch.Tensor]:
        """The tensors this LoRA holds, for the runtime's cache: it counts each storage once, however
        many cached values (recipes, blends) hold this LoRA, and sizes a LoRA once (it is immutable)."""
        return [t for _, _, m in self.modules() for t in m.tensors().values()]

    def ranks(self) -> Counter:
        """How many modules have each rank (None for LoKr with two full factors)."""
        return Counter(m.rank for _, _, m in self.modules())

    def describe(self) -> str:
        """One line: format, algorithm, module counts per component, ranks."""
        parts = ", ".join(f"{c} {len(m)}" for c, m in self.components.items())
        ranks = ", ".join(f"r{r} x{n}" for r, n in sorted(self.ranks().items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
        return f"{self.source_format} {self.algorithm}: {self.n_modules} modules ({parts}); {ranks}"

    def replace(self, **changes: Any) -> "LoRA":
        """A new LoRA with `changes` (dataclasses.replace); remember to give it a new fingerprint."""
        return replace(self, **changes)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def state_dict_fingerprint(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 over names, dtypes, shapes, bytes and metadata: the fingerprint of an in-memory dict."""
    h = hashlib.sha256(b"loraloom-state-dict-v1\0")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t.cpu()))
    h.update(json.dumps(dict(metadata or {}), sort_keys=True).encode())
    return h.hexdigest()


def derived_fingerprint(operation: str, sources: Sequence[str], params: Mapping[str, Any] | None = None) -> str:
    """Fingerprint of a value computed from others: sha256 of the operation, the source
    fingerprints (order kept: it matters for most operations) and the JSON-encoded parameters."""
    payload = json.dumps(
        {"op": operation, "sources": list(sources), "params": dict(params or {})}, sort_keys=True, default=repr
    )
    return hashlib.sha256(payload.encode()).hexdigest()
