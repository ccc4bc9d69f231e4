"""lora/readers.py: format detection, reading every fixture format into the canonical value, alphas,
and the reader's refusals."""
from __future__ import annotations

import pytest
import torch

from loraloom.fixtures import UNET_PRESETS as PRESETS  # the UNet fixture LoRAs' bases (DiTs: dit_files)
from loraloom.lora.errors import LoRAFormatError
from loraloom.lora.match import check_lora
from loraloom.lora.readers import lora_from_state_dict, read_lora

EXPECTED_FORMAT = {
    "diffusers": ("diffusers", "lora"),
    "diffusers-nometa": ("diffusers", "lora"),
    "peft": ("peft", "lora"),
    "kohya": ("kohya", "lora"),
    "kohya-sgm": ("kohya-sgm", "lora"),
    "kohya-noalpha": ("kohya", "lora"),
    "locon": ("kohya", "locon"),  # sd15: diffusers-style names; sdxl: SGM (checked below)
    "loha": ("kohya", "loha"),
    "lokr": ("kohya", "lokr"),
}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("fmt", list(EXPECTED_FORMAT))
def test_detects_format_and_matches_its_base(preset, fmt, lora_files, specs):
    lora = read_lora(lora_files[f"{preset}/{fmt}"])
    want_format, want_algo = EXPECTED_FORMAT[fmt]
    if preset == "tiny-sdxl" and fmt in ("locon", "loha", "lokr"):
        want_format = "kohya-sgm"  # the kohya writer uses SGM names for SDXL, as kohya-ss does
    assert lora.source_format == want_format, f"{fmt}: detected {lora.source_format}"
    allowed = {"lora": {"lora", "locon"}}.get(want_algo, {want_algo})  # SD1.5's proj_in is a 1x1 conv
    assert lora.algorithm in allowed, f"{fmt}: algorithm {lora.algorithm}"
    assert len(lora.fingerprint) >= 32
    report = check_lora(lora, specs[preset])
    assert report.fraction == 1.0 and not report.mismatched, report.summary()
    assert {r for r in lora.ranks() if r} <= {4, 8}


def test_same_lora_in_every_kohya_naming_reads_identically(lora_files):
    for preset in PRESETS:
        a = read_lora(lora_files[f"{preset}/kohya"])
        b = read_lora(lora_files[f"{preset}/kohya-sgm"])
        assert list(a.modules()) and [(c, p) for c, p, _ in a.modules()] == [(c, p) for c, p, _ in b.modules()]
        for (c, p, m), (_, _, n) in zip(a.modules(), b.modules()):
            assert torch.equal(m.down, n.down) and torch.equal(m.up, n.up) and m.alpha == n.alpha, f"{c}.{p}"


def test_alpha_from_metadata_and_default(lora_files):
    with_meta = read_lora(lora_files["tiny-sd15/diffusers"])
    without = read_lora(lora_files["tiny-sd15/diffusers-nometa"])
    noalpha = read_lora(lora_files["tiny-sd15/kohya-noalpha"])
    alphas = {m.alpha for _, _, m in with_meta.modules()}
    assert alphas == {2.0, 3.0, 6.0}, f"per-module alphas from lora_adapter_metadata, got {alphas}"
    assert all(m.alpha == m.rank for _, _, m in without.modules()), "no metadata: alpha = rank"
    assert all(m.alpha == m.rank for _, _, m in noalpha.modules()), "no .alpha keys: alpha = rank"
    assert "alpha from adapter config" in with_meta.notes
    te = with_meta.components["text_encoder"]
    assert all(not p.startswith("text_model.") for p in te), "canonical TE paths have no text_model. prefix"


def test_keeps_dtype_and_does_not_copy():
    down, up = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
    lora = lora_from_state_dict({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up})
    module = lora.components["unet"]["conv_in"]
    assert module.down is down and module.up is up and module.down.dtype == torch.bfloat16


def test_read_is_deterministic_and_fingerprint_is_the_files(lora_files):
    from loraloom.lora.safefile import read_lora_file

    path = lora_files["tiny-sd15/kohya"]
    assert read_lora(path).fingerprint == read_lora_file(path).fingerprint


def test_ranks_disagree_names_key_and_both_ranks():
    sd = {
        "lora_unet_conv_in.lora_down.weight": torch.zeros(4, 36),
        "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 8),
    }
    with pytest.raises(LoRAFormatError, match=r"lora_unet_conv_in.*rank 4.*rank 8") as info:
        lora_from_state_dict(sd, path="bad.safetensors")
    assert info.value.path == "bad.safetensors" and (info.value.value, info.value.limit) == (8, 4)


@pytest.mark.parametrize(
    "keys, match",
    [
        (["lora_unet_conv_in.lora_down.weight", "lora_unet_conv_in.dora_scale"], "DoRA"),
        (["unet.conv_in.lora_A.weight", "unet.conv_in.lora_magnitude_vector"], "DoRA"),
        (["lora_unet_conv_in.lora_mid.weight"], "Tucker"),
        (["diffusion_model.double_blocks.0.img_attn.qkv_typo.lora_A.weight"], "match no module of Flux's original layout"),
        (["foo.bar"], "unknown LoRA key format"),
        (["lora_unet_conv_in.lora_down.weight", "unet.conv_in.lora_A.weight"], "mixed"),
        (["lora_unet_conv_in.lora_down.weight"], "no up"),
    ],
)
def test_refuses_with_clear_errors(keys, match):
    with pytest.raises(LoRAFormatError, match=match):
        lora_from_state_dict({k: torch.zeros(4, 4) for k in keys}, path="x.safetensors")
