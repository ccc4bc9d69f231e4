"""lora/canonical.py: the weight delta of each module kind, by hand and against peft's maths."""
from __future__ import annotations

import pytest
import torch

from loraloom.lora.canonical import LoHaModule, LoKrModule, LoRAModule, delta
from loraloom.lora.errors import LoRAFormatError
from loraloom.lora.readers import read_lora


def test_delta_hand_computed():
    lora = LoRAModule(down=torch.tensor([[1.0, 2.0]]), up=torch.tensor([[3.0], [4.0]]), alpha=2.0)
    assert torch.equal(delta(lora), torch.tensor([[6.0, 12.0], [8.0, 16.0]]))  # 2/1 * [[3],[4]] @ [[1,2]]
    loha = LoHaModule(
        w1a=torch.tensor([[1.0], [2.0]]), w1b=torch.tensor([[1.0, 1.0]]),
        w2a=torch.tensor([[3.0], [1.0]]), w2b=torch.tensor([[1.0, 2.0]]), alpha=0.5,
    )  # fmt: skip
    assert torch.equal(delta(loha), torch.tensor([[1.5, 3.0], [1.0, 2.0]]))  # 0.5 * [[1,1],[2,2]] * [[3,6],[1,2]]
    lokr = LoKrModule(alpha=3.0, w1=torch.tensor([[1.0, 2.0]]), w2a=torch.tensor([[1.0]]), w2b=torch.tensor([[2.0]]))
    assert torch.equal(delta(lokr), torch.tensor([[6.0, 12.0]]))  # 3/1 * kron([[1,2]], [[2]])
    full = LoKrModule(alpha=7.0, w1=torch.tensor([[2.0]]), w2=torch.tensor([[1.0, 3.0]]))
    assert torch.equal(delta(full), torch.tensor([[2.0, 6.0]])), "both factors full: scale 1, alpha ignored"


def test_lokr_rows_select_rows_of_the_product():
    w1, w2 = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # product 6 x 2
    full = torch.kron(w1, w2)
    part = LoKrModule(alpha=1.0, w1=w1, w2=w2, rows=((3, 5), (0, 1)))  # cuts w2-high blocks, reordered
    assert part.shape == (3, 2) and part.kron_rows == 6
    assert torch.equal(delta(part), torch.cat([full[3:5], full[0:1]]))
    for rows in ((), ((2, 2),), ((0, 7),), ((-1, 2),)):
        with pytest.raises(LoRAFormatError, match="are not ranges within its Kronecker product's 6 rows"):
            LoKrModule(alpha=1.0, w1=w1, w2=w2, rows=rows, key="k")


@pytest.mark.parametrize("fmt", ["loha", "lokr"])
def test_lycoris_delta_matches_peft_maths(fmt, lora_files, specs):
    """Independent reference: peft's own LoHa/LoKr rebuild functions."""
    from peft.tuners.loha.layer import make_weight, make_weight_cp
    from peft.tuners.lokr.layer import make_kron, make_weight_cp as lokr_cp

    lora = read_lora(lora_files[f"tiny-sd15/{fmt}"])
    for component, path, m in lora.modules():
        shape = specs["tiny-sd15"].components[component][path].shape
        if fmt == "loha":
            if m.t1 is not None:
                want = make_weight_cp(m.t1, m.w1a, m.w1b, m.t2, m.w2a, m.w2b, scale=torch.tensor(m.scale))
            else:
                want = make_weight(m.w1a, m.w1b, m.w2a, m.w2b, scale=torch.tensor(m.scale))
        else:
            w1 = m.w1 if m.w1 is not None else m.w1a @ m.w1b
            if m.w2 is not None:
                w2 = m.w2
            elif m.t2 is not None:
                w2 = lokr_cp(m.t2, m.w2a, m.w2b)
            else:
                w2 = m.w2a @ m.w2b
            want = make_kron(w1, w2, scale=m.scale)
        torch.testing.assert_close(delta(m, shape), want.reshape(shape), atol=1e-6, rtol=1e-6, msg=f"{component}.{path}")


def test_stacked_factors_put_every_lora_of_a_layer_into_one_matmul():
    from loraloom.lora.canonical import stacked_factors

    one = LoRAModule(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0], [2.0]]), alpha=1.0)
    two = LoRAModule(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [0.0]]), alpha=2.0)
    up, down, scale = stacked_factors([(0.5, one), (3.0, two)])
    assert (up.shape, down.shape, scale) == ((2, 2), (2, 2), 1.0), "fp32: coefficients folded into up"
    assert torch.equal(up @ down, torch.tensor([[7.5, 8.0], [3.0, 4.0]])), "0.5 * one + 3 * 2 * two"


def test_stacked_factors_in_bf16_keep_16_bits_of_the_fp32_product():
    from loraloom.lora.canonical import stacked_factors

    gen = torch.Generator().manual_seed(0)
    conv = LoRAModule(torch.randn(4, 8, 3, 3, generator=gen), torch.randn(16, 4, 1, 1, generator=gen).bfloat16(), alpha=3.0)
    terms = [(0.1, conv), (-0.7, conv)]
    up, down, scale = stacked_factors(terms, torch.bfloat16)
    assert up.dtype == down.dtype == torch.bfloat16 and down.shape[1] == 8 * 9
    assert scale == 0.1 * conv.scale, "the first of the widest LoRAs gives the scale"
    assert up.shape[1] == 4 * 2 + 4 * 3, "fp32 down split (two products); the up scaled by -7 split too (three)"
    want = sum(c * delta(m, dtype=torch.float64) for c, m in terms).flatten(1)
    got = scale * (up.double() @ down.double())
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 2 ** -14, f"bf16 pairs off the fp64 product by {rel:.2g}"
    up, down, scale = stacked_factors(terms[:1], torch.bfloat16)
    rounded = scale * (up[:, :4].double() @ down[:4].double())  # the rounded parts alone
    want = 0.1 * delta(conv, dtype=torch.float64).flatten(1)
    assert float((rounded - want).abs().max() / want.abs().max()) > 2 ** -12, "the remainders carry the precision"


def test_stacked_factors_in_bf16_leave_the_widest_loras_factors_unsplit():
    """The widest LoRA's coefficient becomes the matmul's scale, so its bf16 factors go in as they
    are (no remainder doubling its share of the inner size); a LoRA whose relative coefficient is a
    power of two is not split either."""
    from loraloom.lora.canonical import stacked_factors

    gen = torch.Generator().manual_seed(1)

    def lora(rank, alpha):
        return LoRAModule(torch.randn(rank, 24, generator=gen).bfloat16(), torch.randn(40, rank, generator=gen).bfloat16(), alpha)

    small, wide, other = lora(4, 4.0), lora(8, 4.0), lora(2, 2.0)
    terms = [(0.8, small), (0.45, wide), (0.45, other)]
    up, down, scale = stacked_factors(terms, torch.bfloat16)
    assert scale == 0.45 * wide.scale
    assert up.shape[1] == 4 * 2 + 8 + 2, "only the small LoRA (relative coefficient 0.8 / 0.225) is split"
    assert torch.equal(up[:, 8:16], wide.up) and torch.equal(down[8:16], wide.down), "the widest LoRA goes in unchanged"
    assert torch.equal(up[:, 16:], other.up * 2), "relative coefficient 2: exact in bf16"
    want = sum(c * delta(m, dtype=torch.float64) for c, m in terms)
    rel = float((scale * (up.double() @ down.double()) - want).abs().max() / want.abs().max())
    assert rel < 2 ** -14, f"off the fp64 sum by {rel:.2g}"
    for coeffs in ((0.0, 0.8), (1e-30, 0.8)):  # a zero or extreme ratio: no scale, each up its own coefficient
        up, down, scale = stacked_factors(list(zip(coeffs, (wide, small))), torch.bfloat16)
        want = sum(c * delta(m, dtype=torch.float64) for c, m in zip(coeffs, (wide, small)))
        assert scale == 1.0 and bool(torch.isfinite(up).all()), coeffs
        assert float((up.double() @ down.double() - want).abs().max() / want.abs().max()) < 2 ** -14, coeffs
