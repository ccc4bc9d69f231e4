"""lora/convert.py (as_lora): LyCORIS modules as plain LoRA, exact or SVD-truncated."""
from __future__ import annotations

import pytest
import torch

from loraloom.lora.canonical import delta
from loraloom.lora.convert import as_lora
from loraloom.lora.readers import read_lora


@pytest.mark.parametrize("fmt", ["loha", "lokr"])
def test_lycoris_exact_and_svd_conversion(fmt, lora_files):
    lora = read_lora(lora_files[f"tiny-sdxl/{fmt}"])
    exact = as_lora(lora)
    low = as_lora(lora, rank=2)
    assert exact.fingerprint != lora.fingerprint and low.fingerprint != exact.fingerprint
    for (c, p, m), (_, _, e), (_, _, s) in zip(lora.modules(), exact.modules(), low.modules()):
        want = delta(m)
        torch.testing.assert_close(delta(e, want.shape), want, atol=1e-6, rtol=0, msg=f"{c}.{p} exact")
        assert s.rank <= 2, f"{c}.{p}: SVD rank {s.rank}"
