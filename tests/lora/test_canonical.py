"""lora/canonical.py: the weight delta of each module kind, by hand and against peft's maths."""
from __future__ import annotations

import pytest
import torch

from loraloom.lora.canonical import LoHaModule, LoKrModule, LoRAModule, delta
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
