"""LoHa and LoKr modules as LoRA modules, for everything that needs the plain ``up @ down`` form
(peft adapters, the factor-wise merges, kohya/diffusers writers). `as_lora` converts:

- exactly (``rank=None``): the delta D, of shape [out, in(, kh, kw)], becomes ``up = I_out``,
  ``down = D`` (rank out) when out <= in*kh*kw, else ``down`` = the identity (im2col) kernel and
  ``up = D`` (rank in*kh*kw). ``up @ down`` is D bit for bit; the cost is a full-size factor;
- approximately (``rank=N``): a truncated SVD of D, ``up = U_N * S_N``, ``down = Vh_N`` (the
  best rank-N approximation; fused or merged results then differ from the LyCORIS maths).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .canonical import LoRA, LoRAModule, Module, delta, derived_fingerprint
from .match import base_spec


def _lowrank(module: Module, shape: tuple[int, ...], rank: int | None) -> LoRAModule:
    source = next(iter(module.tensors().values()))
    dtype = source.dtype if source.dtype in (torch.float32, torch.float64) else torch.float32
    full = delta(module, shape, dtype=dtype)
    out, flat_in = full.shape[0], math.prod(full.shape[1:])
    conv = full.ndim == 4
    if rank is None:
        if out <= flat_in:
            down = full
            up = torch.eye(out, dtype=dtype)
        else:
            down = torch.eye(flat_in, dtype=dtype).reshape(flat_in, *full.shape[1:])
            up = full.reshape(out, flat_in)
        r = up.shape[1]
    else:
        u, s, vh = torch.linalg.svd(full.reshape(out, flat_in), full_matrices=False)
        r = max(1, min(rank, s.shape[0]))
        # clone: keep only the kept slices alive, not the whole U / Vh (peft's merged adapters
        # hold 12 GB at SDXL size through such views)
        up = (u[:, :r] * s[:r]).clone()
        down = vh[:r].reshape(r, *full.shape[1:]).clone()
    if conv:
        up = up.reshape(out, r, 1, 1)
    return LoRAModule(down=down, up=up, alpha=float(r), key=module.key)


def as_lora(lora: LoRA, *, rank: int | None = None, base: Any = None) -> LoRA:
    """`lora` with every LoHa/LoKr module turned into a LoRA module (exact with ``rank=None``, a
    rank-`rank` SVD approximation otherwise); LoRA modules are kept as they are. `base` (anything
    `match.base_spec` takes) supplies conv kernel shapes that plain-form LoHa/LoKr cannot carry.
    Returns `lora` itself when there is nothing to convert."""
    if all(m.kind == "lora" for _, _, m in lora.modules()):
        return lora
    spec = base_spec(base) if base is not None else None
    components: dict[str, dict[str, Module]] = {}
    for component, path, module in lora.modules():
        if module.kind != "lora":
            shape = module.shape
            if spec is not None and path in spec.components.get(component, {}):
                shape = spec.components[component][path].shape
            module = _lowrank(module, tuple(shape), rank)
        components.setdefault(component, {})[path] = module
    return lora.replace(
        components=components,
        source_format="derived",
        fingerprint=derived_fingerprint("as_lora", [lora.fingerprint], {"rank": rank}),
        notes=lora.notes + (f"LyCORIS modules converted to LoRA ({'exact' if rank is None else f'SVD rank {rank}'})",),
    )
