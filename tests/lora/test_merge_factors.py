"""lora/merge_factors.py: peft's split of each source's coefficient over A and B, and the order in
which the factor-wise family combines them."""
from __future__ import annotations

import pytest
import torch

from loraloom.lora import merge_ops
from loraloom.lora.merge_factors import factorwise, split_coefficients


def test_split_puts_the_sign_on_the_down_side_only():
    on_down, on_up = split_coefficients([(2.0, 2.0), (-1.0, 0.25), (0.0, 3.0)])
    assert on_down == [2.0, -0.5, 0.0] and on_up == [2.0, 0.5, 0.0]
    for (w, s), d, u in zip([(2.0, 2.0), (-1.0, 0.25), (0.0, 3.0)], on_down, on_up):
        assert d * u == pytest.approx(w * s), "the two halves multiply back to weight * scale"


def test_factorwise_combines_all_downs_then_all_ups():
    seen = []

    def recording_linear(tensors, weights):
        seen.append([t.shape[0] for t in tensors])
        return merge_ops.combine_linear(tensors, weights)

    downs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])]
    ups = [torch.tensor([[1.0], [1.0], [0.0]]), torch.tensor([[0.0], [2.0], [1.0]])]
    down, up = factorwise(recording_linear, downs, ups, [(4.0, 1.0), (-1.0, 1.0)])
    assert seen == [[1, 1], [3, 3]], "A's (rank rows) first, then B's (out rows), each in source order"
    # coefficients 4 and -1 split as (2, -1) on A and (2, 1) on B
    assert down.tolist() == [[2.0 * 1 - 3.0, 2.0 * 2 + 1.0]] and up.tolist() == [[2.0], [4.0], [1.0]]
