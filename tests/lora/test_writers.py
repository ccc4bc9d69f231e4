"""lora/writers.py: kohya and diffusers files written from the canonical value read back exactly,
load in diffusers, and are written atomically."""
from __future__ import annotations

import json

import pytest
import torch

from loraloom.fixtures import PRESETS  # one seeded preset per architecture: the fixture LoRAs' bases
from loraloom.lora import writers
from loraloom.lora.canonical import LoRA
from loraloom.lora.errors import LoRAFormatError
from loraloom.lora.readers import read_lora
from loraloom.lora.safefile import read_lora_file
from loraloom.lora.writers import write_diffusers, write_kohya



def _assert_same(a: LoRA, b: LoRA) -> None:
    assert [(c, p) for c, p, _ in a.modules()] == [(c, p) for c, p, _ in b.modules()]
    for (c, p, m), (_, _, n) in zip(a.modules(), b.modules()):
        assert type(m) is type(n) and m.alpha == n.alpha, f"{c}.{p}"
        for (k, t), (_, u) in zip(m.tensors().items(), n.tensors().items()):
            assert t.dtype == u.dtype and torch.equal(t, u), f"{c}.{p}.{k} changed in the round trip"


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("fmt", ["kohya", "locon", "loha", "lokr", "diffusers"])
def test_kohya_round_trip_is_exact(preset, fmt, lora_files, tmp_path):
    lora = read_lora(lora_files[f"{preset}/{fmt}"])
    for names in ("auto", "diffusers", "sgm"):
        path = write_kohya(lora, tmp_path / f"{names}.safetensors", unet_names=names, provenance={"method": "test"})
        back = read_lora(path)
        _assert_same(lora, back)
        assert back.metadata["loraloom.method"] == "test" and back.metadata["loraloom.fingerprint"] == lora.fingerprint


@pytest.mark.parametrize("preset", PRESETS)
def test_diffusers_round_trip_is_exact_and_loads_in_diffusers(preset, lora_files, tmp_path, tiny_pipeline, sample):
    lora = read_lora(lora_files[f"{preset}/kohya"])  # per-module alphas, both text encoders
    path = write_diffusers(lora, tmp_path / "out.safetensors", provenance={"sources": [lora.fingerprint]})
    back = read_lora(path)
    _assert_same(lora, back)
    assert json.loads(back.metadata["loraloom.sources"]) == [lora.fingerprint]
    from loraloom.bases.adapters import apply_lora

    ours, theirs = tiny_pipeline(preset), tiny_pipeline(preset)
    apply_lora(ours, lora, "loom")
    theirs.load_lora_weights(str(path), adapter_name="ref")
    torch.testing.assert_close(sample(theirs), sample(ours), atol=2e-6, rtol=0, msg="diffusers reads our file exactly")


def test_diffusers_writer_refuses_lycoris_with_fix(lora_files, tmp_path):
    with pytest.raises(LoRAFormatError, match="Fix: convert it with"):
        write_diffusers(read_lora(lora_files["tiny-sd15/loha"]), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir()), "nothing written"


def test_write_is_atomic(lora_files, tmp_path, monkeypatch):
    lora = read_lora(lora_files["tiny-sd15/kohya"])
    target = write_kohya(lora, tmp_path / "out.safetensors")
    before = target.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writers.os, "fsync", explode)  # fails after the data went into the temp file
    with pytest.raises(OSError, match="disk full"):
        write_kohya(lora, target, provenance={"method": "other"})
    assert target.read_bytes() == before, "the old file survives a failed write"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"], "no temp file left behind"


def test_data_is_aligned_and_grouped_by_dtype_with_a_sorted_header(tmp_path):
    # Name order would put "b" (4 bytes wide) at byte 6, after three bf16 values of "a".
    tensors = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2), "c": torch.ones(1, dtype=torch.float16),
               "d": torch.ones(5, dtype=torch.bfloat16), "e": torch.ones(1, dtype=torch.float64)}
    path = writers.atomic_save(tensors, tmp_path / "x.safetensors", {"z": "1", "a": "2"})
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header) == ["__metadata__", "a", "b", "c", "d", "e"], "the header stays sorted by name"
    placed = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    assert [k for _, k in placed] == ["e", "b", "a", "d", "c"], "widest first, then one run per dtype"
    assert all(begin % tensors[k].element_size() == 0 for (begin, _), k in placed)
    got = read_lora_file(path).tensors
    assert all(torch.equal(got[k], t) and got[k].dtype == t.dtype for k, t in tensors.items())
