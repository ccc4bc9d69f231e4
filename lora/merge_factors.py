"""Merges that work on the factors themselves: ``cat`` and the factor-wise family.

Both follow peft's ``add_weighted_adapter`` module by module; every source passed in is present in
the module (the driver drops absent ones, as peft skips adapters a layer does not have).

- ``cat`` stacks the factors: ``down = [w1*s1*A1; w2*s2*A2; ...]``, ``up = [B1, B2, ...]``, so
  ``up @ down = sum_i w_i s_i B_i A_i`` exactly; rank is the sum of ranks. peft puts the weight and
  scale on A only (``A * weight * scaling``); so do we, in the same order of multiplications.
- the factor-wise family (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``)
  combines A's and B's separately. peft splits ``c_i = weight_i * scaling_i`` as ``sqrt(|c_i|) * sign(c_i)`` on A and
  ``sqrt(|c_i|)`` on B, combines all A's (in source order), then all B's. The product therefore
  carries cross terms ``B_i A_j``: these methods approximate the weighted sum only loosely (measured:
  relative error 0.9 for linear on random LoRAs), and they need every source to have the same rank.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Combine = Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]
"""A combination with its options bound: ``combine(tensors, weights) -> tensor`` (see `merge_methods`)."""


def cat(downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], coeffs: Sequence[tuple[float, float]]):
    """Concatenate: returns ``(down, up)`` with ``up @ down == sum_i w_i * s_i * up_i @ down_i``.

    `coeffs` holds ``(weight, scale)`` per source; they multiply A one after the other, as peft does.
    """
    down = torch.cat([a * w * s for a, (w, s) in zip(downs, coeffs)], dim=0)
    up = torch.cat(list(ups), dim=1)
    return down, up


def split_coefficients(coeffs: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """peft's split of ``c = weight * scale`` over A and B: ``(sqrt|c| * sign c, sqrt|c|)`` per source.

    The sign goes on one side only: putting it on both would cancel it.
    """
    on_down, on_up = [], []
    for weight, scale in coeffs:
        c = weight * scale
        root = math.sqrt(abs(c))
        on_down.append(root * (1 if c >= 0 else -1))
        on_up.append(root)
    return on_down, on_up


def factorwise(
    combine: Combine,
    downs: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    coeffs: Sequence[tuple[float, float]],
):
    """Combine all A's, then all B's, each in source order, with `combine(tensors, weights)` (a
    method's combination with its options bound). Returns ``(down, up)`` of the common rank.

    Random draws therefore go all A's first, then all B's (peft's order).
    """
    on_down, on_up = split_coefficients(coeffs)
    down = combine(downs, on_down)
    up = combine(ups, on_up)
    return down, up
