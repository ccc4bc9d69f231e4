"""lora/writers.py: kohya and diffusers files written from the canonical value read back exactly,
load in diffusers, and are written atomically."""
from __future__ import annotations

import json
import math

import pytest
import torch

from loraloom.fixtures import UNET_PRESETS as PRESETS  # the UNet fixture LoRAs' bases (DiTs: dit_files)
from loraloom.lora import writers
from loraloom.lora.canonical import LoRA, LoRAModule, delta
from loraloom.lora.errors import LoRAFormatError
from loraloom.lora.match import check_lora
from loraloom.lora.readers import read_lora
from loraloom.lora.safefile import read_lora_file
from loraloom.lora.writers import write_diffusers, write_kohya



def _assert_same(a: LoRA, b: LoRA) -> None:
    assert [(c, p) for c, p, _ in a.modules()] == [(c, p) for c, p, _ in b.modules()]
    for (c, p, m), (_, _, n) in zip(a.modules(), b.modules()):
        assert type(m) is type(n) and m.alpha == n.alpha and getattr(m, "rows", None) == getattr(n, "rows", None), f"{c}.{p}"
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


# --- Flux / SD3 --------------------------------------------------------------------------------------

DIT_EXPECTED = {
    "tiny-flux/diffusers": ("diffusers", "lora"),
    "tiny-flux/kohya": ("kohya-flux", "lora"),
    "tiny-flux/comfyui": ("bfl", "lora"),
    "tiny-flux/xlabs": ("xlabs", "lora"),
    "tiny-flux/loha": ("kohya-flux", "loha"),
    "tiny-flux/lokr": ("kohya-flux", "lokr"),
    "tiny-sd3/diffusers": ("diffusers", "locon"),
    "tiny-sd3/kohya": ("kohya-sd3", "locon"),
    "tiny-sd3/comfyui": ("sd3-original", "locon"),
}


@pytest.mark.parametrize("name", list(DIT_EXPECTED))
def test_dit_fixtures_read_match_and_round_trip(name, dit_files, dit_pipelines, tmp_path):
    lora = read_lora(dit_files[name])
    fmt, algorithm = DIT_EXPECTED[name]
    assert (lora.source_format, lora.algorithm) == (fmt, algorithm)
    report = check_lora(lora, dit_pipelines[name.split("/")[0]])
    assert report.fraction == 1.0 and report.total > 40, report.summary()
    arch = "flux" if name.startswith("tiny-flux") else "sd3"
    if name.endswith("/diffusers"):
        # separate LoRAs with different alpha / rank on q, k and v: one alpha, the scale ratios in the ups
        _assert_same_parts(lora, read_lora(write_kohya(lora, tmp_path / "k.safetensors", arch=arch)))
    else:
        _assert_same(lora, read_lora(write_kohya(lora, tmp_path / "k.safetensors", arch=arch)))
    if lora.kinds == ("lora",):
        _assert_same(lora, read_lora(write_diffusers(lora, tmp_path / "d.safetensors")))


def _power_of_two(x: float) -> bool:
    return x != 0.0 and math.frexp(abs(x))[0] == 0.5


def _assert_same_parts(a: LoRA, b: LoRA, scale_ratios: dict[str, float] | None = None) -> None:
    """`b` (read back from a file where parts of one fused weight with different scales share one
    alpha) has `a`'s modules: paths, ranks, alphas and downs exact; ups bit for bit where the part's
    scale over the file's (`scale_ratios`, by path; unknown: any) is a power of two, else within
    eps + 2^-21 relative (eps of the up's dtype): the writer's and the reader's rounding of the up
    by the ratio and its inverse (eps / 2 each), and of each ratio to float32 (2^-24 each)."""
    assert [(c, p) for c, p, _ in a.modules()] == [(c, p) for c, p, _ in b.modules()]
    for (c, p, m), (_, _, n) in zip(a.modules(), b.modules()):
        assert m.alpha == n.alpha and torch.equal(m.down, n.down) and m.up.dtype == n.up.dtype, f"{c}.{p}"
        ratio = (scale_ratios or {}).get(p)
        if ratio is not None and _power_of_two(ratio):
            assert torch.equal(m.up, n.up), f"{c}.{p}: ratio {ratio}"
        else:
            rtol = torch.finfo(m.up.dtype).eps + 2**-21
            torch.testing.assert_close(n.up, m.up, atol=0, rtol=rtol, msg=f"{c}.{p}")


def _scale_parts(flux, specs, gen, dtype):
    modules = {}
    for path, rank, alpha in specs:
        out = flux.get_submodule(path).weight.shape[0]
        modules[path] = LoRAModule(down=torch.randn(rank, 16, generator=gen).to(dtype),
                                   up=torch.randn(out, rank, generator=gen).to(dtype), alpha=alpha)  # fmt: skip
    return modules


# (path, rank, alpha): scales 0.5, 2, 0.25 (powers of two apart), and 0.75, 0.25, 1.5 (3x, 6x apart)
_SCALE_PARTS = (("transformer_blocks.3.attn.to_q", 4, 2.0), ("transformer_blocks.3.attn.to_k", 2, 4.0),
                ("transformer_blocks.3.attn.to_v", 4, 1.0), ("single_transformer_blocks.5.attn.to_q", 4, 3.0),
                ("single_transformer_blocks.5.attn.to_k", 8, 2.0), ("single_transformer_blocks.5.proj_mlp", 4, 6.0))


@pytest.mark.parametrize("naming,dtype", [("kohya", torch.float32), ("comfyui", torch.float32),
                                          ("kohya", torch.bfloat16)])  # fmt: skip
def test_parts_with_different_scales_write_one_alpha_and_read_back(flux, tmp_path, naming, dtype):
    from safetensors.torch import load_file

    from loraloom.lora.readers import FUSED_PARTS_KEY

    modules = _scale_parts(flux, _SCALE_PARTS, torch.Generator().manual_seed(12), dtype)
    lora = LoRA({"transformer": modules}, source_format="derived", fingerprint="f" * 64)
    path = write_kohya(lora, tmp_path / "scales.safetensors", naming=naming)
    tensors = load_file(path)
    prefix = "lora_unet_{}_{}" if naming == "kohya" else "diffusion_model.{}.{}"
    down_up = ("lora_down", "lora_up") if naming == "kohya" else ("lora_A", "lora_B")
    ratios = {}
    for blocks, index, inner, parts in (("double_blocks", 3, "img_attn.qkv", _SCALE_PARTS[:3]),
                                        ("single_blocks", 5, "linear1", _SCALE_PARTS[3:])):
        key = prefix.format(f"{blocks}_{index}" if naming == "kohya" else f"{blocks}.{index}",
                            inner.replace(".", "_") if naming == "kohya" else inner)
        down, up = tensors[f"{key}.{down_up[0]}.weight"], tensors[f"{key}.{down_up[1]}.weight"]
        assert down.shape[0] == sum(rank for _, rank, _ in parts), "downs stacked"
        # the delta as ComfyUI's loader computes it from the file: up @ down * alpha / rank
        file_scale = float(tensors[f"{key}.alpha"]) / down.shape[0]
        assert up.dtype == dtype
        fused = up.float() @ down.float() * file_scale
        rows = {p: delta(modules[p]) for p, _, _ in parts}
        height = {"linear1": 7 * 16, "img_attn.qkv": 3 * 16}[inner]
        want, bound = torch.zeros(height, 16), torch.zeros(height, 16)
        for p, d in rows.items():
            start = {"to_q": 0, "to_k": 16, "to_v": 32, "proj_mlp": 48}[p.rsplit(".", 1)[1]]
            want[start : start + d.shape[0]] = d
            m = modules[p]
            # one rounding of each up element (eps / 2 relative), and fp32 maths
            bound[start : start + d.shape[0]] = (torch.finfo(dtype).eps / 2 + 1e-6) * (
                m.up.float().abs() @ m.down.float().abs() * abs(m.scale))
            ratios[p] = m.scale / file_scale
        assert bool(((fused - want).abs() <= bound + 1e-7).all()), key
        if all(_power_of_two(ratios[p]) for p in rows):
            assert torch.equal(fused, want), f"{key}: power-of-two ratios are exact"
    # the file takes the scale of the parts with the most rank (to_q's of qkv: the first of a tie,
    # to_k's of linear1), whose ups go in unchanged; linear1's to_q and proj_mlp are 3x and 6x it
    assert ratios == {"transformer_blocks.3.attn.to_q": 1.0, "transformer_blocks.3.attn.to_k": 4.0,
                      "transformer_blocks.3.attn.to_v": 0.5, "single_transformer_blocks.5.attn.to_q": 3.0,
                      "single_transformer_blocks.5.attn.to_k": 1.0, "single_transformer_blocks.5.proj_mlp": 6.0}
    record = json.loads(read_lora_file(path).metadata[FUSED_PARTS_KEY])
    assert sorted(record.values()) == [[[4, 2.0], [2, 4.0], [4, 1.0]], [[4, 3.0], [8, 2.0], [0, 0.0], [4, 6.0]]]
    _assert_same_parts(lora, read_lora(path), ratios)


def test_separate_qkv_loras_fuse_exactly_with_stacked_downs(flux, tmp_path):
    gen = torch.Generator().manual_seed(11)
    modules = {}
    for path, rank in (("transformer_blocks.3.attn.to_q", 4), ("transformer_blocks.3.attn.to_v", 2),
                       ("single_transformer_blocks.5.attn.to_k", 2), ("single_transformer_blocks.5.proj_mlp", 4)):
        out = flux.get_submodule(path).weight.shape[0]
        modules[path] = LoRAModule(down=torch.randn(rank, 16, generator=gen), up=torch.randn(out, rank, generator=gen),
                                   alpha=rank / 2)  # fmt: skip
    lora = LoRA({"transformer": modules}, source_format="derived", fingerprint="f" * 64)
    path = write_kohya(lora, tmp_path / "stacked.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(path)
    down = tensors["lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight"]
    up = tensors["lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight"]
    assert down.shape == (6, 16) and up.shape == (48, 6), "downs stacked, up block-diagonal"
    fused = up @ down * float(tensors["lora_unet_double_blocks_3_img_attn_qkv.alpha"]) / 6
    q, v = modules["transformer_blocks.3.attn.to_q"], modules["transformer_blocks.3.attn.to_v"]
    torch.testing.assert_close(fused, torch.cat([delta(q), torch.zeros(16, 16), delta(v)]), atol=1e-6, rtol=0)
    back = read_lora(path)
    _assert_same(lora, back)  # the part ranks recorded in the metadata split it back exactly


def test_dit_kohya_file_reads_in_diffusers(dit_files, dit_pipelines, tmp_path):
    # diffusers' kohya converter reads our fused double-block modules with the same deltas (its
    # top-level modules and tiny-width linear1 it cannot read: see test_dit_formats.py)
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(dit_files["tiny-flux/kohya"]).items() if "double_blocks" in k}
    ours = read_lora(dit_files["tiny-flux/kohya"])
    from diffusers import FluxPipeline

    import copy

    flux = dit_pipelines["tiny-flux"].transformer
    ref = copy.deepcopy(flux)
    sd, alphas = FluxPipeline.lora_state_dict(tensors, return_alphas=True)
    FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=ref, adapter_name="ref")
    ref.fuse_lora()
    n = 0
    for path, module in ours.components["transformer"].items():
        if path.startswith("transformer_blocks."):
            want = flux.get_submodule(path).weight + delta(module)
            torch.testing.assert_close(ref.get_submodule(path).base_layer.weight, want, atol=2e-6, rtol=0, msg=path)
            n += 1
    assert n == 4 * 14  # 4 blocks x (to_q/k/v, to_out.0, add_q/k/v, to_add_out, ff x 2, ff_context x 2, norm1, norm1_context)


@pytest.mark.parametrize("preset", ["tiny-flux", "tiny-sd3"])
def test_dit_diffusers_file_loads_in_diffusers(preset, dit_files, dit_pipelines, tmp_path):
    import copy

    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    lora = read_lora(dit_files[f"{preset}/kohya"])
    path = write_diffusers(lora, tmp_path / "d.safetensors")
    base = dit_pipelines[preset].transformer
    ref = copy.deepcopy(base)
    if preset == "tiny-flux":
        sd, alphas, metadata = FluxPipeline.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
        FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=ref, adapter_name="ref",
                                                metadata=metadata)  # fmt: skip
    else:
        sd, metadata = StableDiffusion3Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
        StableDiffusion3Pipeline.load_lora_into_transformer(sd, transformer=ref, adapter_name="ref", metadata=metadata)
    ref.fuse_lora()
    for module_path, module in lora.components["transformer"].items():
        layer = ref.get_submodule(module_path)
        want = base.get_submodule(module_path).weight + delta(module, base.get_submodule(module_path).weight.shape)
        torch.testing.assert_close(getattr(layer, "base_layer", layer).weight, want, atol=2e-6, rtol=0, msg=module_path)


@pytest.mark.parametrize("name", ["tiny-flux/kohya", "tiny-flux/comfyui", "tiny-sd3/kohya"])
def test_dit_bf16_file_round_trips_bit_for_bit(name, dit_files, tmp_path):
    from safetensors.torch import load_file

    bf16 = {k: v if k.endswith(".alpha") else v.to(torch.bfloat16) for k, v in load_file(dit_files[name]).items()}
    writers.atomic_save(bf16, tmp_path / "bf16.safetensors", {"format": "pt"})
    lora = read_lora(tmp_path / "bf16.safetensors")
    assert {t.dtype for _, _, m in lora.modules() for t in m.tensors().values()} == {torch.bfloat16}
    arch = name.split("/")[0][len("tiny-"):]
    path = write_kohya(lora, tmp_path / "back.safetensors", arch=arch)
    _assert_same(lora, read_lora(path))
    written = load_file(path)
    for key, tensor in bf16.items():
        if key.startswith("lora_unet_"):
            assert torch.equal(written[key], tensor) and written[key].dtype == tensor.dtype, key


def test_lokr_rows_alone_are_refused_by_the_kohya_writer(tmp_path):
    # rows of a product stand only beside their sibling parts (a fused Flux weight); written alone,
    # the factors would give the whole product
    from loraloom.lora.canonical import LoKrModule

    part = LoKrModule(alpha=1.0, w1=torch.ones(2, 1), w2=torch.ones(3, 4), rows=((2, 5),), key="k")
    lora = LoRA({"unet": {"down_blocks.0.attentions.0.proj_in": part}}, source_format="derived", fingerprint="r" * 64)
    with pytest.raises(LoRAFormatError, match=r"rows \[\(2, 5\)\] of a LoKr's Kronecker product.*Fix: write it with"):
        write_kohya(lora, tmp_path / "k.safetensors", arch="sd15")
    assert not (tmp_path / "k.safetensors").exists()
