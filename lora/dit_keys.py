"""Flux and SD3 module names in their original layouts <-> diffusers module paths, and the exact
split (and re-fuse) of LoRAs on the original layouts' fused projections.

The original checkpoints (Black Forest Labs' Flux, Stability's MMDiT) name modules
``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, ``joint_blocks.N.x_block.attn.qkv``;
kohya writes the same names with underscores (``lora_unet_double_blocks_0_img_attn_qkv``), ComfyUI
with dots under ``diffusion_model.``, XLabs under ``processor.qkv_lora1`` and so on. diffusers
(`FluxTransformer2DModel`, `SD3Transformer2DModel`) has separate ``attn.to_q`` / ``to_k`` / ``to_v``
(and, in Flux's single blocks, ``proj_mlp``) where the original has one fused linear whose output
rows are ``[q; k; v]`` (``[q; k; v; mlp]`` for ``linear1``).

A delta on a fused weight splits exactly by output rows: row block i of ``up @ down`` is
``up[rows_i] @ down``. So a LoRA on ``qkv`` becomes three LoRAs with the same ``down`` and alpha
and the up's row slices; a LoHa keeps ``w1b`` / ``w2b`` and slices ``w1a`` / ``w2a``; a LoKr
``kron(w1, w2)`` slices ``w1`` when the part boundaries fall on multiples of ``w2``'s row count,
and otherwise keeps both factors and selects its rows of the product (`LoKrModule.rows`): LyCORIS
factors Flux's ``linear1`` (21504 = 3 * 3072 + 12288 rows) as w1 128 x 48, w2 168 x 64, and 3072
is no multiple of 168. The final layer's modulation is stored (shift, scale) in the original and
(scale, shift) in diffusers: a row permutation, exact the same way.

Row selection was chosen over an exact factorisation of each part: ``kron(w1, w2) =
kron(w1, I) @ kron(I, w2)``, restricted to a part's rows, is a LoRA of rank 48 * 168 = 8064 on
linear1's 3072-wide input, its down 8064 x 3072 and its up 2.6 times the part's own weight (3 times
all of linear1's dense weight for the four parts, against 17K values in the file's two factors).
The parts keep the file's factors, and the writer re-fuses them into the file's module bit for bit.

A `Target` says which rows of the original output a diffusers module takes, in units of the
module's input width (the hidden size for every fused projection here).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from .canonical import LoHaModule, LoKrModule, LoRAModule, Module
from .errors import LoRAFormatError

Segments = tuple[tuple[int, int | None], ...]
"""Row ranges ``(start, stop)`` of the original output, in units of the input width; ``None``
stop = to the end. A diffusers module's rows are the concatenation of its segments."""

WHOLE: Segments = ((0, None),)
_SWAP: Segments = ((1, 2), (0, 1))  # (shift, scale) -> (scale, shift)
FLUX_MLP_RATIO = 4  # Flux's single-block MLP is 4x the hidden size (ComfyUI's loader assumes it too)


@dataclass(frozen=True)
class Target:
    """One diffusers module fed by (part of) an original module."""

    path: str
    segments: Segments = WHOLE
    open_units: int = 0  # height of an open-ended segment when the LoRA lacks this part


def _whole(path: str) -> tuple[Target, ...]:
    return (Target(path),)


def _thirds(a: str, b: str, c: str) -> tuple[Target, ...]:
    return Target(a, ((0, 1),)), Target(b, ((1, 2),)), Target(c, ((2, 3),))


_FLUX_DOUBLE: dict[str, tuple[Target, ...]] = {
    "img_attn.qkv": _thirds("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": _thirds("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": _whole("attn.to_out.0"),
    "txt_attn.proj": _whole("attn.to_add_out"),
    "img_mlp.0": _whole("ff.net.0.proj"),
    "img_mlp.2": _whole("ff.net.2"),
    "txt_mlp.0": _whole("ff_context.net.0.proj"),
    "txt_mlp.2": _whole("ff_context.net.2"),
    "img_mod.lin": _whole("norm1.linear"),
    "txt_mod.lin": _whole("norm1_context.linear"),
}
_FLUX_SINGLE: dict[str, tuple[Target, ...]] = {
    "linear1": (*_thirds("attn.to_q", "attn.to_k", "attn.to_v"), Target("proj_mlp", ((3, None),), FLUX_MLP_RATIO)),
    # XLabs' single-block qkv_lora (and ComfyUI's name for it): the first 3 * hidden rows of linear1
    "linear1_qkv": _thirds("attn.to_q", "attn.to_k", "attn.to_v"),
    "linear2": _whole("proj_out"),
    "modulation.lin": _whole("norm.linear"),
}
_FLUX_TOP: dict[str, tuple[Target, ...]] = {
    "img_in": _whole("x_embedder"),
    "txt_in": _whole("context_embedder"),
    "time_in.in_layer": _whole("time_text_embed.timestep_embedder.linear_1"),
    "time_in.out_layer": _whole("time_text_embed.timestep_embedder.linear_2"),
    "vector_in.in_layer": _whole("time_text_embed.text_embedder.linear_1"),
    "vector_in.out_layer": _whole("time_text_embed.text_embedder.linear_2"),
    "guidance_in.in_layer": _whole("time_text_embed.guidance_embedder.linear_1"),
    "guidance_in.out_layer": _whole("time_text_embed.guidance_embedder.linear_2"),
    "final_layer.linear": _whole("proj_out"),
    "final_layer.adaLN_modulation.1": (Target("norm_out.linear", _SWAP),),
}
_SD3_JOINT: dict[str, tuple[Target, ...]] = {
    "x_block.attn.qkv": _thirds("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": _thirds("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": _thirds("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn.proj": _whole("attn.to_out.0"),
    "x_block.attn2.proj": _whole("attn2.to_out.0"),
    "context_block.attn.proj": _whole("attn.to_add_out"),
    "x_block.mlp.fc1": _whole("ff.net.0.proj"),
    "x_block.mlp.fc2": _whole("ff.net.2"),
    "context_block.mlp.fc1": _whole("ff_context.net.0.proj"),
    "context_block.mlp.fc2": _whole("ff_context.net.2"),
    "x_block.adaLN_modulation.1": _whole("norm1.linear"),
    # The last block's context modulation has 2 chunks (shift, scale) in the original and (scale,
    # shift) in diffusers; the others have 6 in the same order. `targets_for` tells them by shape.
    "context_block.adaLN_modulation.1": _whole("norm1_context.linear"),
}
_SD3_TOP: dict[str, tuple[Target, ...]] = {
    "x_embedder.proj": _whole("pos_embed.proj"),
    "context_embedder": _whole("context_embedder"),
    "t_embedder.mlp.0": _whole("time_text_embed.timestep_embedder.linear_1"),
    "t_embedder.mlp.2": _whole("time_text_embed.timestep_embedder.linear_2"),
    "y_embedder.mlp.0": _whole("time_text_embed.text_embedder.linear_1"),
    "y_embedder.mlp.2": _whole("time_text_embed.text_embedder.linear_2"),
    "final_layer.linear": _whole("proj_out"),
    "final_layer.adaLN_modulation.1": (Target("norm_out.linear", _SWAP),),
}

BLOCKS = {"flux": {"double_blocks": _FLUX_DOUBLE, "single_blocks": _FLUX_SINGLE}, "sd3": {"joint_blocks": _SD3_JOINT}}
"""arch -> original block-list name -> module name inside a block -> targets."""
TOP = {"flux": _FLUX_TOP, "sd3": _SD3_TOP}
"""arch -> original top-level module name -> targets."""
DIFFUSERS_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks",
                    "joint_blocks": "transformer_blocks"}  # fmt: skip
"""Original block-list name -> diffusers block-list name."""

_ORIGINAL_BLOCK = re.compile(r"^(double_blocks|single_blocks|joint_blocks)\.(\d+)\.(.+)$")
_KOHYA_BLOCK = re.compile(r"^(double_blocks|single_blocks|joint_blocks)_(\d+)_(.+)$")


_UNDERSCORED: dict[int, dict[str, str]] = {}


def _underscored(table: Mapping[str, tuple[Target, ...]]) -> dict[str, str]:
    """kohya spelling -> dotted name of a table's names (built once per table: files have thousands of keys)."""
    found = _UNDERSCORED.get(id(table))
    if found is None:
        found = _UNDERSCORED[id(table)] = {name.replace(".", "_"): name for name in table}
    return found


def original_archs(name: str) -> frozenset[str]:
    """The architectures ("flux", "sd3") having an original-layout module of this name (dotted or
    kohya-underscored); a few top-level names (``final_layer.linear``) belong to both."""
    head = name.split(".", 1)[0].split("_blocks", 1)[0]
    if head in ("double", "single"):
        return frozenset({"flux"})
    if head == "joint":
        return frozenset({"sd3"})
    return frozenset(arch for arch, table in TOP.items() if name in table or name in _underscored(table))


def original_targets(name: str, arch: str, *, underscored: bool = False) -> tuple[str, tuple[Target, ...]] | None:
    """(dotted original name, targets with full diffusers paths) of an original-layout module name
    (``double_blocks.3.img_attn.qkv``, or ``double_blocks_3_img_attn_qkv`` with `underscored`), or
    None when `arch` has no such module."""
    m = (_KOHYA_BLOCK if underscored else _ORIGINAL_BLOCK).match(name)
    if m:
        blocks, index, inner = m.group(1), int(m.group(2)), m.group(3)
        table = BLOCKS[arch].get(blocks)
        if table is None:
            return None
        inner = _underscored(table).get(inner) if underscored else inner
        if inner not in table:
            return None
        prefix = f"{DIFFUSERS_BLOCKS[blocks]}.{index}."
        targets = tuple(dataclasses.replace(t, path=prefix + t.path) for t in table[inner])
        return f"{blocks}.{index}.{inner}", targets
    table = TOP[arch]
    dotted = _underscored(table).get(name) if underscored else name
    if dotted not in table:
        return None
    return dotted, table[dotted]


def targets_for(name: str, targets: tuple[Target, ...], shape: Sequence[int]) -> tuple[Target, ...]:
    """`targets` adjusted to the module's weight `shape` (out, in): SD3's last-block context
    modulation (out = 2 * in) is stored (shift, scale) and maps with the two halves swapped."""
    if name.endswith("context_block.adaLN_modulation.1") and shape[0] == 2 * shape[1]:
        return tuple(dataclasses.replace(t, segments=_SWAP) for t in targets)
    return targets


def check_tiling(targets: Sequence[Target], shape: Sequence[int], key: str) -> None:
    """Raise LoRAFormatError unless `targets` take every output row of a fused module of weight
    `shape` exactly once (a qkv LoRA must be 3 x its input width high: more rows would be lost)."""
    unit, total = int(shape[1]), int(shape[0])
    rows = sorted(r for t in targets for r in _rows(t.segments, unit, total, key))
    edges = [0] + [b for _, b in rows]
    if any(a != edges[i] for i, (a, _) in enumerate(rows)) or edges[-1] != total:
        raise LoRAFormatError(
            f"module {key!r}: its output has {total} rows; the fused layout of "
            f"{', '.join(t.path for t in targets)} takes {edges[-1]} rows of a {unit}-wide model",
            key=key,
            value=total,
            limit=edges[-1],
        )


def _rows(segments: Segments, unit: int, total: int, key: str) -> list[tuple[int, int]]:
    out = []
    for start, stop in segments:
        a, b = start * unit, total if stop is None else stop * unit
        if not 0 <= a < b <= total:
            raise LoRAFormatError(
                f"module {key!r}: its output has {total} rows, too few for the fused layout "
                f"(rows {a}..{b} of a {unit}-wide model)",
                key=key,
                value=total,
                limit=b,
            )
        out.append((a, b))
    return out


def _take(t: torch.Tensor, rows: list[tuple[int, int]]) -> torch.Tensor:
    # One range: a view (no copy, like the rest of the reader); several (a permutation): a new tensor.
    parts = [t[a:b] for a, b in rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def split_module(module: Module, segments: Segments, key: str) -> Module:
    """The part of `module` (a delta on a fused weight ``[out, unit]``-wide) that lands on the rows
    `segments` (in units of the input width): exact, see the module docstring (a LoKr whose
    Kronecker blocks straddle a part boundary selects its rows of the product)."""
    if segments == WHOLE:
        return module
    if isinstance(module, LoRAModule):
        unit, total = int(module.down.shape[1]), int(module.up.shape[0])
        return dataclasses.replace(module, up=_take(module.up, _rows(segments, unit, total, key)))
    if isinstance(module, LoHaModule):
        if module.t1 is not None:
            raise LoRAFormatError(f"module {key!r}: a Tucker-form (conv) LoHa on a fused linear", key=key)
        unit, total = int(module.w1b.shape[1]), int(module.w1a.shape[0])
        rows = _rows(segments, unit, total, key)
        return dataclasses.replace(module, w1a=_take(module.w1a, rows), w2a=_take(module.w2a, rows))
    (out_l, _), w2_shape = module._factor_shapes()
    out_k = w2_shape[0]
    total, unit = module.shape[0], module.shape[1]
    rows = _rows(segments, unit, total, key)
    if module.rows is not None or any(r % out_k for ab in rows for r in ab):
        # shape_hint dropped: the part's shape is its rows'
        return dataclasses.replace(module, rows=_select(module.rows or ((0, out_l * out_k),), rows), shape_hint=None)
    w1_rows = [(a // out_k, b // out_k) for a, b in rows]
    if module.w1 is not None:
        return dataclasses.replace(module, w1=_take(module.w1, w1_rows), shape_hint=None)
    return dataclasses.replace(module, w1a=_take(module.w1a, w1_rows), shape_hint=None)


def _select(ranges: Sequence[tuple[int, int]], rows: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """`rows` (ranges of the concatenation of `ranges`) as ranges of what `ranges` index."""
    out: list[tuple[int, int]] = []
    for a, b in rows:
        offset = 0
        for start, stop in ranges:
            lo, hi = max(a, offset), min(b, offset + stop - start)
            if lo < hi:
                piece = (start + lo - offset, start + hi - offset)
                if out and out[-1][1] == piece[0]:
                    piece = (out.pop()[0], piece[1])
                out.append(piece)
            offset += stop - start
    return tuple(out)


def fuse_modules(parts: Sequence[tuple[Target, Module | None]], key: str) -> Module:
    """The one module on a fused original weight whose rows are `parts` (every target of that
    weight, in order; None where the LoRA has no module): the inverse of `split_module`.

    Parts that share their ``down`` (LoRA), ``w1b``/``w2b`` (LoHa) or ``w2`` factors (LoKr) and
    their alpha re-fuse with those shared tensors, and LoKr parts that select rows of one product
    re-fuse into that product, so a fused module read, split and written again comes back bit for
    bit. LoRA parts with different downs (or alphas) fuse as stacked downs with a block-diagonal
    up and one alpha (`_stacked_scale`): each part's up block carries its scale's ratio to the fused
    module's scale, exact when every ratio is 1 or a power of two, else one rounding of the up (in
    its dtype) per element. Raises LoRAFormatError where no single module can hold the parts.
    """
    present = [(t, m) for t, m in parts if m is not None]
    if not present:
        raise LoRAFormatError(f"fused module {key!r}: no part to fuse", key=key)
    kinds = {m.kind for _, m in present}
    if len(kinds) > 1:
        raise LoRAFormatError(
            f"fused module {key!r}: its parts are of different kinds ({', '.join(sorted(kinds))})",
            key=key,
            value=sorted(kinds),
            fix="convert the LoRA with loraloom.lora.convert.as_lora first.",
        )
    first = present[0][1]
    if isinstance(first, LoRAModule):
        return _fuse_lora(parts, key)
    return _fuse_lycoris(parts, key)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def _fuse_lycoris(parts: Sequence[tuple[Target, Module | None]], key: str) -> Module:
    # LoHa parts re-fuse when they share w1b, w2b and alpha (rows of w1a / w2a stack); LoKr parts
    # when they share w2 (or w2a, w2b), w1b and alpha (rows of w1 / w1a stack, in w2-high blocks).
    present = [m for _, m in parts if m is not None]
    first = present[0]
    if any(isinstance(m, LoKrModule) and m.rows is not None for m in present):
        return _fuse_lokr_rows(parts, key)
    if isinstance(first, LoHaModule):
        names, row_factors = ("w1b", "w2b", "t1", "t2"), ("w1a", "w2a")
        unit, block = int(first.w1b.shape[1]), 1
    else:
        names, row_factors = ("w2", "w2a", "w2b", "t2", "w1b"), (("w1",) if first.w1 is not None else ("w1a",))
        unit, block = int(first.shape[1]), int(first._factor_shapes()[1][0])
    shared = all(m.alpha == first.alpha and all(_same(getattr(m, n), getattr(first, n)) for n in names)
                 and all(getattr(m, f) is not None for f in row_factors) for m in present)  # fmt: skip
    if not shared:
        raise LoRAFormatError(
            f"fused module {key!r}: its {first.kind} parts do not share their "
            f"{', '.join(n for n in names if getattr(first, n) is not None)} factors and alpha, so no single "
            f"{first.kind} module on the fused weight equals them",
            key=key,
            value=first.kind,
            fix="convert the LoRA with loraloom.lora.convert.as_lora first, or write it in diffusers layout.",
        )
    total = _fused_rows(parts, unit)
    fused = {}
    for f in row_factors:
        dest = getattr(first, f).new_zeros(total // block, getattr(first, f).shape[1])
        for target, m in parts:
            if m is not None:
                rows = [(a // block, b // block) for a, b in _part_rows(target, unit, total)]
                _put(dest, getattr(m, f), rows)
        fused[f] = dest
    return dataclasses.replace(first, key=key, shape_hint=None, **fused)


def _fuse_lokr_rows(parts: Sequence[tuple[Target, Module | None]], key: str) -> LoKrModule:
    # Parts that select rows of one Kronecker product (split_module of a LoKr whose blocks straddle
    # the part boundaries) are that product again when every part is there, with the same factors
    # and alpha, each selecting exactly its target's rows: the file's module, its tensors unchanged.
    first = next(m for _, m in parts if m is not None)
    names = ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")
    total, unit = first.kron_rows, int(first.shape[1])
    problem = None
    for target, m in parts:
        if m is None:
            problem = f"it has no part for {target.path}"
        elif not (m.alpha == first.alpha and all(_same(getattr(m, n), getattr(first, n)) for n in names)):
            problem = f"its part for {target.path} has other factors or alpha than the first"
        elif tuple(m.rows or ()) != tuple(_part_rows(target, unit, total)):
            problem = f"its part for {target.path} selects rows {list(m.rows or ())} of the product, not its own"
        if problem:
            break
    if problem is None:
        return dataclasses.replace(first, key=key, rows=None, shape_hint=None)
    raise LoRAFormatError(
        f"fused module {key!r}: its LoKr parts select rows of one Kronecker product whose blocks straddle "
        f"the parts' boundaries, and {problem}; only the whole product can be written on the fused weight",
        key=key,
        value=problem,
        fix="convert the LoRA with loraloom.lora.convert.as_lora first (exact), or keep every part of the module unchanged.",
    )


def _part_rows(target: Target, unit: int, total: int) -> list[tuple[int, int]]:
    return _rows(target.segments, unit, total, target.path)


def _fuse_lora(parts: Sequence[tuple[Target, LoRAModule | None]], key: str) -> LoRAModule:
    present = [m for _, m in parts if m is not None]
    first = present[0]
    unit = int(first.down.shape[1])
    total = _fused_rows(parts, unit)
    shared = all(m.down is first.down or (m.down.shape == first.down.shape and torch.equal(m.down, first.down))
                 for m in present) and all(m.alpha == first.alpha for m in present)  # fmt: skip
    dtype = first.up.dtype
    if shared:
        up = first.up.new_zeros(total, first.rank)
        for target, m in parts:
            if m is not None:
                _put(up, m.up, _part_rows(target, unit, total))
        return LoRAModule(down=first.down, up=up, alpha=first.alpha, key=key)
    downs = [m.down.to(dtype) if m.down.dtype != dtype else m.down for m in present]
    rank = sum(m.rank for m in present)
    alpha, scale = _stacked_scale([(m.rank, m.alpha) for m in present])
    up = first.up.new_zeros(total, rank)
    col = 0
    for target, m in parts:
        if m is None:
            continue
        block = up[:, col : col + m.rank]
        ratio = _ratio(m.scale, scale)
        _put(block, m.up if ratio == 1.0 else m.up * ratio, _part_rows(target, unit, total))
        col += m.rank
    return LoRAModule(down=torch.cat(downs, 0), up=up, alpha=alpha, key=key)


def _ratio(scale: float, over: float) -> float:
    # a zero scale (alpha 0) part: its block is zero whatever the ratio; 1 where nothing can divide
    return 1.0 if scale == over or over == 0.0 else scale / over


def _stacked_scale(parts: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(alpha, scale) of a fused LoRA with stacked downs over `parts` ((rank, alpha) of each present
    part): the scale of the parts holding the most rank (ties: the first), whose ups then go in
    unchanged; alpha = scale * total rank, rounded to float32 as a file stores it, and scale =
    that alpha / total rank, what a loader computes from the file (the ratio each part's up block
    carries is its own scale over this one)."""
    by_scale: dict[float, int] = {}
    for rank, alpha in parts:
        by_scale[alpha / rank] = by_scale.get(alpha / rank, 0) + rank
    # max keeps the first of equal counts; a zero scale only when every part has one
    chosen = max(by_scale, key=lambda s: (s != 0.0, by_scale[s]))
    rank = sum(r for r, _ in parts)
    alpha = float(torch.tensor(chosen * rank, dtype=torch.float32))
    return alpha, alpha / rank


def _fused_rows(parts: Sequence[tuple[Target, Module | None]], unit: int) -> int:
    # A part ending "to the end" (Flux's proj_mlp) takes its height from its module.
    total = 0
    for target, m in parts:
        for start, stop in target.segments:
            if stop is None:
                height = target.open_units * unit if m is None else _out_rows(m)
                total = max(total, start * unit + height)
            else:
                total = max(total, stop * unit)
    return total


def _out_rows(module: Module) -> int:
    return int(module.shape[0])


def _put(dest: torch.Tensor, rows_value: torch.Tensor, rows: list[tuple[int, int]]) -> None:
    offset = 0
    for a, b in rows:
        dest[a:b] = rows_value[offset : offset + b - a]
        offset += b - a


def split_stacked(module: LoRAModule, targets: Sequence[Target], parts: Sequence[tuple[int, float]], key: str
                  ) -> list[LoRAModule | None]:
    """The parts of a fused LoRA written with stacked downs and a block-diagonal up (`fuse_modules`
    of parts with different downs): `parts` gives (rank, alpha) per target, rank 0 for an absent
    part. A part whose scale differs from the file's gets its up block divided by the ratio the
    writer baked in: its original up bit for bit when the ratio is a power of two, else within two
    roundings of the up's dtype (one each way). Raises LoRAFormatError when the ranks do not add up
    or the up is not block-diagonal."""
    if sum(r for r, _ in parts) != module.rank or len(parts) != len(targets):
        raise LoRAFormatError(
            f"module {key!r}: the recorded part ranks {[r for r, _ in parts]} do not add up to its rank "
            f"{module.rank} over {len(targets)} parts",
            key=key,
            value=[r for r, _ in parts],
            limit=module.rank,
        )
    unit, total = int(module.down.shape[1]), int(module.up.shape[0])
    out: list[LoRAModule | None] = []
    col = 0
    for target, (rank, alpha) in zip(targets, parts):
        rows = _rows(target.segments, unit, total, key)
        mask = torch.ones(total, dtype=torch.bool)
        for a, b in rows:
            mask[a:b] = False
        if rank and bool(module.up[mask][:, col : col + rank].any()):
            raise LoRAFormatError(
                f"module {key!r}: its up is not block-diagonal over the recorded parts (rank columns "
                f"{col}..{col + rank} reach outside {target.path}'s rows)",
                key=key,
            )
        part = None
        if rank:
            up = _take(module.up[:, col : col + rank], rows)
            ratio = _ratio(module.scale, alpha / rank)
            if ratio != 1.0:  # the writer multiplied the part's up by the inverse ratio
                up = up * ratio
            part = LoRAModule(down=module.down[col : col + rank], up=up, alpha=float(alpha), key=key)
        out.append(part)
        col += rank
    return out


def diffusers_to_original(path: str, arch: str) -> tuple[str, tuple[Target, ...]] | None:
    """(dotted original name, targets) of the original module a diffusers transformer module path
    belongs to (``transformer_blocks.3.attn.to_k`` -> ``double_blocks.3.img_attn.qkv``), or None."""
    m = _DIFFUSERS_BLOCK.match(path)
    if m:
        blocks = _BLOCK_OF[arch].get(m.group(1))
        inner = _REVERSE[arch].get(blocks, {}).get(m.group(3))
        return None if inner is None else original_targets(f"{blocks}.{m.group(2)}.{inner}", arch)
    name = _REVERSE_TOP[arch].get(path)
    return None if name is None else original_targets(name, arch)


_DIFFUSERS_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_BLOCK_OF = {arch: {DIFFUSERS_BLOCKS[b]: b for b in tables} for arch, tables in BLOCKS.items()}
# diffusers inner path -> original inner name ("linear1_qkv" is XLabs' alias of linear1's q/k/v rows)
_REVERSE = {
    arch: {b: {t.path: inner for inner, ts in table.items() if inner != "linear1_qkv" for t in ts}
           for b, table in tables.items()}
    for arch, tables in BLOCKS.items()
}  # fmt: skip
_REVERSE_TOP = {arch: {t.path: name for name, ts in table.items() for t in ts} for arch, table in TOP.items()}


def diffusers_path_of_underscored(name: str) -> str | None:
    """The diffusers transformer module path of an underscored one (OneTrainer's
    ``lora_transformer_`` and SimpleTuner's ``lycoris_`` names without their prefix:
    ``single_transformer_blocks_7_proj_mlp`` -> ``single_transformer_blocks.7.proj_mlp``), or None."""
    m = _UNDERSCORED_BLOCK.match(name)
    if m:
        inner = _UNDERSCORED_INNER[m.group(1)].get(m.group(3))
        return None if inner is None else f"{m.group(1)}.{m.group(2)}.{inner}"
    return _UNDERSCORED_TOP.get(name)


_UNDERSCORED_BLOCK = re.compile(r"^(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)$")
# every module path the tables name, both architectures: diffusers' names do not depend on the arch
_UNDERSCORED_INNER: dict[str, dict[str, str]] = {}
for _arch, _tables in BLOCKS.items():
    for _blocks, _table in _tables.items():
        _inner = _UNDERSCORED_INNER.setdefault(DIFFUSERS_BLOCKS[_blocks], {})
        _inner.update({t.path.replace(".", "_"): t.path for ts in _table.values() for t in ts})
_UNDERSCORED_TOP = {t.path.replace(".", "_"): t.path for table in TOP.values() for ts in table.values() for t in ts}


def original_name_table(arch: str, n_blocks: Mapping[str, int]) -> Iterable[tuple[str, tuple[Target, ...]]]:
    """Every (dotted original name, targets) of `arch` with `n_blocks` blocks per block list."""
    for blocks, table in BLOCKS[arch].items():
        for index in range(n_blocks.get(blocks, 0)):
            for inner in table:
                found = original_targets(f"{blocks}.{index}.{inner}", arch)
                assert found is not None
                yield found
    for name, targets in TOP[arch].items():
        yield name, targets
