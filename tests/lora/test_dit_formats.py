"""Flux and SD3 LoRA layouts (lora/dit_keys.py, lora/readers.py): every layout reads into the
canonical value on diffusers' module paths, and the delta each module gets equals the delta diffusers
applies (loaded into a tiny FluxTransformer2DModel / SD3Transformer2DModel with the real block counts
and fused), or, where diffusers drops or cannot read a layout, the exact split of the fused delta."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from loraloom.lora.canonical import LoHaModule, LoKrModule, LoRAModule, delta
from loraloom.lora.dit_keys import BLOCKS, TOP, original_name_table
from loraloom.lora.errors import LoRAFormatError
from loraloom.lora.match import check_lora, guess_architecture
from loraloom.lora.readers import lora_from_state_dict

H = 16  # hidden size of the tiny models (2 heads of 8)
FLUX_BLOCKS = {"double_blocks": 19, "single_blocks": 38}
SD3_BLOCKS = {"joint_blocks": 38}


def _weights(model) -> dict[str, torch.Tensor]:
    """Linear / conv weights by module path (peft-wrapped layers report their base layer)."""
    out = {}
    for name, sub in model.named_modules():
        layer = getattr(sub, "base_layer", sub)
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name and ".base_layer" not in name:
            out[name] = layer.weight.detach().clone()
    return out


def _original_shape(weights, targets) -> tuple[int, int]:
    """(out, in) of an original-layout module from its diffusers targets' weights."""
    shapes = [tuple(weights[t.path].shape) for t in targets]
    if len(targets) == 1:
        return shapes[0][0], math.prod(shapes[0][1:])
    return sum(s[0] for s in shapes), shapes[0][1]


def _random_pair(gen, out, inp, rank):
    return torch.randn(rank, inp, generator=gen) / math.sqrt(inp), torch.randn(out, rank, generator=gen) * 0.3


def _kohya_flux(weights, gen, *, skip=()) -> dict[str, torch.Tensor]:
    """A kohya Flux LoRA on every original module (ranks 4 / 8, alphas != rank)."""
    sd = {}
    for i, (name, targets) in enumerate(original_name_table("flux", FLUX_BLOCKS)):
        if any(s in name for s in skip) or name.endswith("linear1_qkv"):
            continue
        if any(t.path not in weights for t in targets):
            continue
        out, inp = _original_shape(weights, targets)
        down, up = _random_pair(gen, out, inp, 4 if i % 2 else 8)
        key = "lora_unet_" + name.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                   f"{key}.alpha": torch.tensor(float(2 + i % 3))})  # fmt: skip
    return sd


def _ours_fused(model, lora) -> dict[str, torch.Tensor]:
    weights = _weights(model)
    for component, path, module in lora.modules():
        if component == "transformer":
            weights[path] = weights[path] + delta(module, weights[path].shape)
    return weights


def _diffusers_fused(model, state_dict, mixin="flux") -> dict[str, torch.Tensor]:
    """Weights after diffusers' own lora_state_dict + load_lora_into_transformer + fuse_lora."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if mixin == "flux" else StableDiffusion3Pipeline
    ref = copy.deepcopy(model)
    kwargs = {}
    if mixin == "flux":
        converted, kwargs["network_alphas"] = cls.lora_state_dict(dict(state_dict), return_alphas=True)
    else:
        converted = cls.lora_state_dict(dict(state_dict))
        converted = converted[0] if isinstance(converted, tuple) else converted
    cls.load_lora_into_transformer(converted, transformer=ref, adapter_name="ref", **kwargs)
    ref.fuse_lora(lora_scale=1.0)
    return _weights(ref)


def _assert_weights_equal(ours, theirs, what, atol=2e-6):
    assert ours.keys() == theirs.keys()
    changed = 0
    for path in ours:
        torch.testing.assert_close(ours[path], theirs[path], atol=atol, rtol=0, msg=f"{what}: {path}")
        changed += 0 if torch.equal(ours[path], _BASE[path]) else 1
    return changed


_BASE: dict[str, torch.Tensor] = {}


@pytest.fixture()
def base_weights(flux):
    _BASE.clear()
    _BASE.update(_weights(flux))
    return _BASE


# --- Flux -------------------------------------------------------------------------------------------


def test_kohya_flux_matches_diffusers(flux, base_weights):
    # diffusers' kohya converter hard-codes the real model's linear1 split (3072 x 3 + 12288), so at
    # tiny width single-block linear1 is compared with it at real width in the test below.
    gen = torch.Generator().manual_seed(1)
    sd = _kohya_flux(base_weights, gen, skip=("linear1",))
    lora = lora_from_state_dict(sd)
    assert lora.source_format == "kohya-flux"
    assert check_lora(lora, {"transformer": flux}).fraction == 1.0
    assert guess_architecture(lora)[0] == "flux"
    ours, theirs = _ours_fused(flux, lora), _diffusers_fused(flux, sd)
    # diffusers' converter names the top-level modules (img_in, txt_in, time_in, vector_in,
    # guidance_in, final_layer) without the "transformer." prefix, so its loader skips them without a
    # word: their weights stay the base's. Their exact split is checked against the file in
    # test_bfl_layout_splits_exactly_and_equals_kohya.
    top = {t.path for targets in TOP["flux"].values() for t in targets}
    assert top <= set(lora.components["transformer"])
    for path in top:
        assert torch.equal(theirs[path], base_weights[path]), f"diffusers now loads {path}: update the comment"
        assert not torch.equal(ours[path], base_weights[path]), path
        theirs[path] = ours[path]
    changed = _assert_weights_equal(ours, theirs, "kohya-flux")
    assert changed == lora.n_modules, "every module changes a weight"
    # diffusers bakes alpha / rank into the factors; we keep the file's tensors and alphas
    module = lora.components["transformer"]["transformer_blocks.0.attn.to_q"]
    assert module.down is sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert module.alpha == float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"])


def test_kohya_flux_linear1_matches_diffusers_at_real_width():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    gen = torch.Generator().manual_seed(2)
    h, mlp, rank = 3072, 12288, 4
    down, up = _random_pair(gen, 3 * h + mlp, h, rank)
    key = "lora_unet_single_blocks_5_linear1"
    sd = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    ours = lora_from_state_dict(sd).components["transformer"]
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    probe = torch.randn(h, 3, generator=gen)
    for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        path = f"single_transformer_blocks.5.{name}"
        a, b = theirs[f"transformer.{path}.lora_A.weight"], theirs[f"transformer.{path}.lora_B.weight"]
        m = ours[path]
        torch.testing.assert_close(m.scale * (m.up @ (m.down @ probe)), b @ (a @ probe), atol=1e-5, rtol=1e-5,
                                   msg=path)  # fmt: skip
    assert ours["single_transformer_blocks.5.proj_mlp"].shape == (mlp, h)
    # ... and at any other width diffusers' converter fails (an assert on its hard-coded split); we split by
    # the hidden size the down carries
    small = {f"{key}.lora_down.weight": torch.zeros(4, H), f"{key}.lora_up.weight": torch.ones(7 * H, 4)}
    with pytest.raises(AssertionError):
        _convert_kohya_flux_lora_to_diffusers(dict(small))
    assert lora_from_state_dict(small).components["transformer"]["single_transformer_blocks.5.proj_mlp"].shape == (4 * H, H)


def test_xlabs_matches_diffusers(flux, base_weights):
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for i in range(19):
        for proc, out in (("qkv_lora1", 3 * H), ("qkv_lora2", 3 * H), ("proj_lora1", H), ("proj_lora2", H)):
            down, up = _random_pair(gen, out, H, 4)
            sd[f"double_blocks.{i}.processor.{proc}.down.weight"] = down
            sd[f"double_blocks.{i}.processor.{proc}.up.weight"] = up
    for i in range(38):
        for proc, out, inp in (("qkv_lora", 3 * H, H), ("proj_lora", H, 5 * H)):
            down, up = _random_pair(gen, out, inp, 4)
            sd[f"single_blocks.{i}.processor.{proc}.down.weight"] = down
            sd[f"single_blocks.{i}.processor.{proc}.up.weight"] = up
    lora = lora_from_state_dict(sd)
    assert lora.source_format == "xlabs" and lora.n_modules == 19 * 8 + 38 * 4
    changed = _assert_weights_equal(_ours_fused(flux, lora), _diffusers_fused(flux, sd), "xlabs")
    assert changed == lora.n_modules


@pytest.mark.parametrize("prefix", ["transformer.", "base_model.model."])
def test_diffusers_and_peft_layouts_match_diffusers(flux, base_weights, prefix):
    # AI-Toolkit / SimpleTuner write diffusers' layout; some trainers save peft's base_model.model.
    gen = torch.Generator().manual_seed(4)
    sd = {}
    for i, path in enumerate(p for p in base_weights if p.startswith(("transformer_blocks.1.", "single_transformer_blocks.37."))):
        out, inp = base_weights[path].shape
        down, up = _random_pair(gen, out, inp, 4)
        sd[f"{prefix}{path}.lora_A.weight"] = down
        sd[f"{prefix}{path}.lora_B.weight"] = up
        if i % 2:
            sd[f"{prefix}{path}.alpha"] = torch.tensor(2.0)  # TheLastBen-style alpha keys
    lora = lora_from_state_dict(sd)
    assert set(lora.components) == {"transformer"}
    assert check_lora(lora, {"transformer": flux}).fraction == 1.0
    ours = _ours_fused(flux, lora)
    if prefix == "transformer.":
        theirs = _diffusers_fused(flux, sd)
        # A module without an alpha key has alpha = rank (kohya's and ComfyUI's rule, scale 1);
        # diffusers gives it the file's most common alpha instead (2 here: half the delta).
        for path, module in lora.components["transformer"].items():
            if f"{prefix}{path}.alpha" not in sd:
                assert module.alpha == module.rank == 4
                torch.testing.assert_close(theirs[path] - base_weights[path], (ours[path] - base_weights[path]) / 2,
                                           atol=2e-6, rtol=0)  # fmt: skip
                theirs[path] = ours[path]
        _assert_weights_equal(ours, theirs, prefix)
    else:
        # diffusers takes any key containing "base_model" for a fal Kontext LoRA (original names) and
        # fails on peft's prefix with a KeyError; we read it.
        with pytest.raises(KeyError, match="base_model.model.double_blocks"):
            _diffusers_fused(flux, sd)


def _fused_delta_rows(lora, name, targets, shape):
    """The fused original delta rebuilt from our split parts, in the original row order."""
    out = torch.zeros(shape)
    unit = shape[1]
    for t in targets:
        part = delta(lora.components["transformer"][t.path])
        offset = 0
        for start, stop in t.segments:
            a = start * unit
            b = shape[0] if stop is None else stop * unit
            out[a:b] = part[offset : offset + b - a]
            offset += b - a
    return out


def test_bfl_layout_splits_exactly_and_equals_kohya(flux, base_weights):
    gen = torch.Generator().manual_seed(5)
    kohya = _kohya_flux(base_weights, gen)
    bfl = {}
    for key, t in kohya.items():
        name, _, role = key.partition(".")
        dotted = next(n for n, _ in original_name_table("flux", FLUX_BLOCKS) if n.replace(".", "_") == name[len("lora_unet_"):])
        role = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(role, role)
        bfl[f"diffusion_model.{dotted}.{role}"] = t
    a, b = lora_from_state_dict(kohya), lora_from_state_dict(bfl)
    assert b.source_format == "bfl"
    # ComfyUI's loader also takes kohya's lora_down / lora_up spelling after the dotted names
    c = lora_from_state_dict({k.replace("lora_A.weight", "lora_down.weight").replace("lora_B.weight", "lora_up.weight"): v
                              for k, v in bfl.items()})  # fmt: skip
    assert c.source_format == "bfl" and [p for _, p, _ in c.modules()] == [p for _, p, _ in b.modules()]
    assert [(c, p) for c, p, _ in a.modules()] == [(c, p) for c, p, _ in b.modules()]
    for (_, p, m), (_, _, n) in zip(a.modules(), b.modules()):
        assert torch.equal(m.up, n.up) and torch.equal(m.down, n.down) and m.alpha == n.alpha, p
    # every fused module: its delta is exactly the concatenation of the parts' deltas
    for name, targets in original_name_table("flux", FLUX_BLOCKS):
        key = "lora_unet_" + name.replace(".", "_")
        if f"{key}.lora_down.weight" not in kohya:
            continue
        down, up = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"]
        full = up @ down * (float(kohya[f"{key}.alpha"]) / down.shape[0])
        assert torch.equal(_fused_delta_rows(b, name, targets, tuple(full.shape)), full), name
    # diffusers loads nothing from the BFL / ComfyUI lora_A / lora_B layout (its keys do not start
    # with "transformer."), silently
    theirs = _diffusers_fused(flux, bfl)
    assert all(torch.equal(theirs[p], base_weights[p]) for p in base_weights), "diffusers changed nothing"


def test_lycoris_on_fused_qkv_splits_exactly(flux, base_weights):
    gen = torch.Generator().manual_seed(6)
    loha = LoHaModule(w1a=torch.randn(3 * H, 4, generator=gen), w1b=torch.randn(4, H, generator=gen),
                      w2a=torch.randn(3 * H, 4, generator=gen), w2b=torch.randn(4, H, generator=gen), alpha=2.0)
    # LoKr with w2 8 rows high: the q / k / v boundaries (16, 32) fall on multiples of 8
    lokr = LoKrModule(alpha=3.0, w1=torch.randn(6, 2, generator=gen), w2a=torch.randn(8, 2, generator=gen),
                      w2b=torch.randn(2, 8, generator=gen))  # fmt: skip
    linear1 = LoKrModule(alpha=1.0, w1=torch.randn(7, 1, generator=gen), w2=torch.randn(16, 16, generator=gen))
    modules = {"double_blocks.2.img_attn.qkv": loha, "single_blocks.4.linear1": linear1, "double_blocks.3.txt_attn.qkv": lokr}
    sd = {}
    for name, module in modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd.update({f"{key}.{k}": v for k, v in module.tensors().items()})
        sd[f"{key}.alpha"] = torch.tensor(module.alpha)
    lora = lora_from_state_dict(sd)
    assert lora.source_format == "kohya-flux" and lora.algorithm == "loha+lokr"
    table = dict(original_name_table("flux", FLUX_BLOCKS))
    for name, module in modules.items():
        full = delta(module)
        assert torch.equal(_fused_delta_rows(lora, name, table[name], tuple(full.shape)), full), name
    assert check_lora(lora, {"transformer": flux}).fraction == 1.0
    # diffusers' Flux loader has no converter for LyCORIS keys in kohya names: it loads nothing
    # ("No LoRA keys associated to FluxTransformer2DModel found", a log line), so the model is unchanged
    theirs = _diffusers_fused(flux, sd)
    assert all(torch.equal(theirs[p], base_weights[p]) for p in base_weights)


def _straddling_lokrs(gen):
    """LoKr modules on fused weights whose Kronecker blocks straddle the part boundaries, as
    LyCORIS' factors of Flux's linear1 do (w2 168 rows high, parts 3072 rows)."""
    def r(*dims):
        return torch.randn(*dims, generator=gen, dtype=torch.float64).float()

    return {
        # w2 12 rows high: the q / k / v boundaries (16, 32) cut Kronecker blocks (the shapes peft's
        # LoKr makes for a 48 x 16 weight with decompose_factor 4 and r 2)
        "double_blocks.0.img_attn.qkv": LoKrModule(alpha=3.0, w1=r(4, 4), w2a=r(12, 2), w2b=r(2, 4)),
        # linear1: 112 = 8 x 14 rows (LyCORIS' own factors at this size), boundaries 16, 32, 48
        "single_blocks.5.linear1": LoKrModule(alpha=2.0, w1a=r(8, 3), w1b=r(3, 4), w2=r(14, 4)),
        # (shift, scale) -> (scale, shift): one w2 block 32 rows high, cut in the middle
        "final_layer.adaLN_modulation.1": LoKrModule(alpha=1.0, w1=r(1, 4), w2=r(32, 4)),
    }


def _lycoris_file(modules):
    sd = {}
    for name, module in modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd.update({f"{key}.{k}": v for k, v in module.tensors().items()})
        sd[f"{key}.alpha"] = torch.tensor(module.alpha)
    return sd


def _kron64(module):
    """scale * kron(w1, w2) of a LoKr, in float64, by hand."""
    f = {k: v.double() for k, v in module.tensors().items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    return torch.kron(w1, w2) * module.scale


def test_lokr_straddling_part_boundaries_reads_and_patches_exactly(flux, tmp_path):
    from safetensors.torch import load_file

    from loraloom.bases.pool import patch_weight
    from loraloom.lora.writers import write_kohya

    modules = _straddling_lokrs(torch.Generator().manual_seed(7))
    sd = _lycoris_file(modules)
    lora = lora_from_state_dict(sd, path="x.safetensors")
    assert lora.source_format == "kohya-flux" and lora.algorithm == "lokr"
    assert check_lora(lora, {"transformer": flux}).fraction == 1.0
    weights = _weights(flux)
    table = dict(original_name_table("flux", FLUX_BLOCKS))
    for name, module in modules.items():
        reference = _kron64(module)
        unit = reference.shape[1]
        for target in table[name]:
            part = lora.components["transformer"][target.path]
            assert part.rows is not None, target.path
            assert all(t is u for t, u in zip(part.tensors().values(), module.tensors().values())), "factors shared"
            rows = [(a * unit, reference.shape[0] if b is None else b * unit) for a, b in target.segments]
            want = torch.cat([reference[a:b] for a, b in rows])  # the dense product's rows, sliced by hand
            weight = weights[target.path].clone()
            patch_weight(weight, weights[target.path], (("f", 1.0, part),))
            torch.testing.assert_close(weight.double(), weights[target.path].double() + want, atol=1e-6, rtol=1e-6)
            # and bit for bit the fp32 product's rows: each element is the same single product
            assert torch.equal(delta(part), torch.cat([delta(module)[a:b] for a, b in rows])), target.path
    # peft's LoKr on diffusers' own fused q / k / v projection (attn.fuse_projections) of block 0
    # changes it as our three parts change to_q / to_k / to_v
    from peft import LoKrConfig, inject_adapter_in_model

    qkv = modules["double_blocks.0.img_attn.qkv"]
    ref = copy.deepcopy(flux)
    ref.transformer_blocks[0].attn.fuse_projections()
    inject_adapter_in_model(LoKrConfig(r=2, alpha=qkv.alpha, decompose_factor=4,
                                       target_modules=["transformer_blocks.0.attn.to_qkv"]), ref)  # fmt: skip
    layer = ref.transformer_blocks[0].attn.to_qkv
    with torch.no_grad():
        for name in ("w1", "w2_a", "w2_b"):
            getattr(layer, f"lokr_{name}")["default"].copy_(getattr(qkv, name.replace("_", "")))
    layer.merge()
    ours = []
    for path in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"):
        weight = weights[path].clone()
        patch_weight(weight, weights[path], (("f", 1.0, lora.components["transformer"][path]),))
        ours.append(weight)
    torch.testing.assert_close(layer.base_layer.weight.detach(), torch.cat(ours), atol=2e-6, rtol=0)
    # written back in the original layout: the file's modules, bit for bit
    back = load_file(write_kohya(lora, tmp_path / "k.safetensors", arch="flux"))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)


def test_fixture_lokr_straddles_linear1_and_reads_exactly(dit_files):
    from safetensors.torch import load_file

    from loraloom.lora.readers import read_lora

    tensors = load_file(dit_files["tiny-flux/lokr"])
    lora = read_lora(dit_files["tiny-flux/lokr"])
    checked = 0
    for name, targets in original_name_table("flux", FLUX_BLOCKS):
        key = "lora_unet_" + name.replace(".", "_")
        if not name.endswith(".linear1") or f"{key}.alpha" not in tensors:
            continue
        roles = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(key + ".")}
        module = LoKrModule(alpha=float(roles.pop("alpha")), **{_LOKR_FIELDS[k]: v for k, v in roles.items()})
        reference = _kron64(module)
        parts = [lora.components["transformer"][t.path] for t in targets]
        assert all(p.rows is not None for p in parts), f"{name}: its Kronecker blocks straddle the parts"
        torch.testing.assert_close(torch.cat([delta(p) for p in parts]).double(), reference, atol=1e-6, rtol=1e-6)
        checked += 1
    assert checked == 4


_LOKR_FIELDS = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
                "lokr_w2_b": "w2b"}  # fmt: skip


def test_lokr_straddling_parts_that_cannot_be_one_product_are_an_error(tmp_path):
    from safetensors.torch import load_file

    from loraloom.lora.convert import as_lora
    from loraloom.lora.writers import write_kohya

    lora = lora_from_state_dict(_lycoris_file(_straddling_lokrs(torch.Generator().manual_seed(8))))
    mods = dict(lora.components["transformer"])
    del mods["single_transformer_blocks.5.attn.to_k"]
    partial = lora.replace(components={"transformer": mods})
    with pytest.raises(LoRAFormatError, match=r"straddle the parts' boundaries, and it has no part for "
                       r"single_transformer_blocks.5.attn.to_k.*Fix: convert the LoRA with .*as_lora"):  # fmt: skip
        write_kohya(partial, tmp_path / "k.safetensors", arch="flux")
    assert not (tmp_path / "k.safetensors").exists()
    # converted to exact LoRA pairs it writes, with the same deltas
    exact = lora_from_state_dict(load_file(write_kohya(as_lora(partial), tmp_path / "e.safetensors", arch="flux")))
    for path, module in mods.items():
        assert torch.equal(delta(exact.components["transformer"][path]), delta(module)), path


def test_keys_matching_nothing_are_named():
    sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, H),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * H, 4),
        "lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight": torch.zeros(4, H),
        "lora_unet_double_blocks_0_img_attn_qkvx.lora_up.weight": torch.zeros(3 * H, 4),
    }
    with pytest.raises(LoRAFormatError, match=r"1 key\(s\) match no module of Flux.*qkvx") as info:
        lora_from_state_dict(sd, path="x.safetensors")
    assert info.value.path == "x.safetensors" and info.value.key == "lora_unet_double_blocks_0_img_attn_qkvx"


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_text_encoders_kohya(arch, text_encoders):
    clip, t5 = text_encoders
    gen = torch.Generator().manual_seed(8)
    # Flux: lora_te1_ CLIP-L, lora_te2_ T5; SD3: lora_te1_ CLIP-L, lora_te2_ CLIP-G, lora_te3_ T5
    encoders = {"flux": (("lora_te1_text_model_", clip, "text_encoder"), ("lora_te2_", t5, "text_encoder_2")),
                "sd3": (("lora_te1_text_model_", clip, "text_encoder"), ("lora_te2_text_model_", clip, "text_encoder_2"),
                        ("lora_te3_", t5, "text_encoder_3"))}[arch]  # fmt: skip
    sd = {}
    for prefix, model, _ in encoders:
        for name, sub in model.named_modules():
            if isinstance(sub, torch.nn.Linear) and (".layers.0." in name or ".block.1." in name):
                down, up = _random_pair(gen, sub.weight.shape[0], sub.weight.shape[1], 4)
                key = prefix + name.replace("text_model.", "").replace(".", "_")
                sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
    top = "img_in" if arch == "flux" else "context_embedder"
    sd[f"lora_unet_{top}.lora_down.weight"] = torch.zeros(4, 8)
    sd[f"lora_unet_{top}.lora_up.weight"] = torch.zeros(H, 4)
    lora = lora_from_state_dict(sd)
    assert lora.source_format == f"kohya-{arch}"
    # CLIP layer 0: q, k, v, out, fc1, fc2; T5 block 1: q, k, v, o, wi_0, wi_1, wo
    assert {c: len(m) for c, m in lora.components.items() if c != "transformer"} == {
        component: 7 if model is t5 else 6 for _, model, component in encoders}
    report = check_lora(lora, {component: model for _, model, component in encoders}, min_fraction=0.9)
    assert report.total - len(report.matched) == 1  # the transformer module: no transformer given


# --- SD3 --------------------------------------------------------------------------------------------


def test_sd3_diffusers_layout_matches_diffusers(sd3):
    gen = torch.Generator().manual_seed(9)
    weights = _weights(sd3)
    sd = {}
    for path in (p for p in weights if p.startswith(("transformer_blocks.0.", "transformer_blocks.37."))):
        out, inp = weights[path].shape
        down, up = _random_pair(gen, out, inp, 4)
        sd[f"transformer.{path}.lora_A.weight"], sd[f"transformer.{path}.lora_B.weight"] = down, up
    lora = lora_from_state_dict(sd)
    assert guess_architecture(lora)[0] == "sd3" and check_lora(lora, {"transformer": sd3}).fraction == 1.0
    ours, theirs = _ours_fused(sd3, lora), _diffusers_fused(sd3, sd, "sd3")
    for path in ours:
        torch.testing.assert_close(ours[path], theirs[path], atol=2e-6, rtol=0, msg=path)


def test_kohya_sd3_splits_exactly_and_diffusers_drops_it(sd3):
    gen = torch.Generator().manual_seed(10)
    weights = _weights(sd3)
    sd, original = {}, {}
    for i, (name, targets) in enumerate(original_name_table("sd3", SD3_BLOCKS)):
        if any(t.path not in weights or weights[t.path].ndim != 2 for t in targets):
            continue  # attn2 (SD3.5 medium) is not in this model; pos_embed.proj is a conv
        out, inp = _original_shape(weights, targets)
        down, up = _random_pair(gen, out, inp, 4)
        key = "lora_unet_" + name.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(8.0)})
        original[f"diffusion_model.{name}.lora_A.weight"] = down
        original[f"diffusion_model.{name}.lora_B.weight"] = up
        original[f"diffusion_model.{name}.alpha"] = torch.tensor(8.0)
    lora = lora_from_state_dict(sd)
    assert lora.source_format == "kohya-sd3"
    assert check_lora(lora, {"transformer": sd3}).fraction == 1.0
    same = lora_from_state_dict(original)
    assert same.source_format == "sd3-original"
    assert [(p, m.up.shape) for _, p, m in same.modules()] == [(p, m.up.shape) for _, p, m in lora.modules()]
    for name, targets in original_name_table("sd3", SD3_BLOCKS):
        key = "lora_unet_" + name.replace(".", "_")
        if f"{key}.alpha" not in sd:
            continue
        down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
        full = up @ down * 2.0
        from loraloom.lora.dit_keys import targets_for

        fitted = targets_for(name, targets, tuple(full.shape))
        assert torch.equal(_fused_delta_rows(lora, name, fitted, tuple(full.shape)), full), name
    # The last block's context modulation is (shift, scale) in the file, (scale, shift) in diffusers
    last = lora.components["transformer"]["transformer_blocks.37.norm1_context.linear"]
    up = sd["lora_unet_joint_blocks_37_context_block_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(last.up, torch.cat([up[H:], up[:H]]))
    # diffusers' SD3 loader has no kohya converter: it loads nothing, without an error
    from diffusers import StableDiffusion3Pipeline

    ref = copy.deepcopy(sd3)
    StableDiffusion3Pipeline.load_lora_into_transformer(StableDiffusion3Pipeline.lora_state_dict(dict(sd)),
                                                        transformer=ref, adapter_name="ref")  # fmt: skip
    assert all(torch.equal(w, weights[p]) for p, w in _weights(ref).items())


def test_tables_name_every_block_module():
    assert set(BLOCKS) == set(TOP) == {"flux", "sd3"}
    assert len(list(original_name_table("flux", FLUX_BLOCKS))) == 19 * 10 + 38 * 4 + 10


def _underscored_file(lora, prefix):
    """`lora` (canonical) as a kohya-style file on underscored diffusers paths."""
    from loraloom.lora.writers import to_kohya_state_dict

    sd = {}
    for component, path, module in lora.modules():
        if component != "transformer":
            continue
        name = prefix + path.replace(".", "_")
        for role, tensor in module.tensors().items():
            sd[f"{name}.{ {'down': 'lora_down.weight', 'up': 'lora_up.weight'}.get(role, role)}"] = tensor
        sd[f"{name}.alpha"] = torch.tensor(module.alpha)
    te = {k: v for k, v in to_kohya_state_dict(lora, arch="flux").items() if k.startswith("lora_te")}
    return {**sd, **te}


def test_onetrainer_layout_reads_and_diffusers_mangles_it(dit_files, dit_pipelines):
    from loraloom.lora.readers import read_lora

    flux = dit_pipelines["tiny-flux"].transformer  # the fixture files are on the preset's modules
    _BASE.clear()
    _BASE.update(_weights(flux))

    lora = read_lora(dit_files["tiny-flux/kohya"])
    sd = _underscored_file(lora, "lora_transformer_")
    back = lora_from_state_dict(sd)
    assert back.source_format == "onetrainer"
    assert [(c, p) for c, p, _ in back.modules()] == [(c, p) for c, p, _ in lora.modules()]
    for (_, p, m), (_, _, n) in zip(lora.modules(), back.modules()):
        assert torch.equal(m.up, n.up) and torch.equal(m.down, n.down) and m.alpha == n.alpha, p
    # diffusers' converter for these names maps attention projections only: a feed-forward, norm or
    # single-block proj_mlp / proj_out LoRA is renamed to its whole block, every one of a block onto
    # the same key ("transformer.transformer_blocks.0.lora_A.weight", each overwriting the last)
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    ff = {k: v for k, v in sd.items() if k.startswith("lora_transformer_transformer_blocks_0_")}
    converted = _convert_kohya_flux_lora_to_diffusers(dict(ff))
    assert "transformer.transformer_blocks.0.lora_A.weight" in converted
    attn_only = {k: v for k, v in sd.items() if k.startswith("lora_transformer_") and "_attn_" in k}
    ours = _ours_fused(flux, lora_from_state_dict(attn_only))
    _assert_weights_equal(ours, _diffusers_fused(flux, attn_only), "onetrainer attention")


def test_simpletuner_lycoris_layout_reads(dit_files):
    from loraloom.lora.readers import read_lora

    lora = read_lora(dit_files["tiny-flux/lokr"])
    # SimpleTuner trains one LoKr per diffusers module: never rows of a fused module's product
    whole = {p: m for p, m in lora.components["transformer"].items() if m.rows is None}
    assert len(whole) < len(lora.components["transformer"])
    lora = lora.replace(components={"transformer": whole})
    back = lora_from_state_dict({k: v for k, v in _underscored_file(lora, "lycoris_").items() if k.startswith("lycoris_")})
    assert back.source_format == "simpletuner-lycoris" and back.algorithm == "lokr"
    assert [(c, p) for c, p, _ in back.modules()] == [(c, p) for c, p, _ in lora.modules()]
    for (_, p, m), (_, _, n) in zip(lora.modules(), back.modules()):
        assert all(torch.equal(t, u) for t, u in zip(m.tensors().values(), n.tensors().values())), p


def test_fused_module_of_the_wrong_height_is_an_error():
    # a qkv LoRA 4 x hidden high: splitting it into q / k / v would silently lose a quarter of it
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, H),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(4 * H, 4)}  # fmt: skip
    with pytest.raises(LoRAFormatError, match=r"output has 64 rows; the fused layout of .*to_q.* takes 48 rows"):
        lora_from_state_dict(sd, path="x.safetensors")


def test_kohya_alpha_kept_where_diffusers_bakes_it_into_bf16_factors():
    # diffusers' kohya Flux converter multiplies alpha / rank into the (bf16) factors and drops the
    # alpha: the stored tensors change (rounded to bf16) and the alpha cannot be written back. We keep
    # the file's tensors and alpha, and apply the scale in fp32.
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    gen = torch.Generator().manual_seed(12)
    key = "lora_unet_double_blocks_0_img_attn_proj"
    down = torch.randn(4, H, generator=gen).to(torch.bfloat16)
    up = torch.randn(H, 4, generator=gen).to(torch.bfloat16)
    sd = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(3.3)}
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    a = theirs["transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"]
    b = theirs["transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"]
    exact = up.float() @ down.float() * (float(sd[f"{key}.alpha"]) / 4)
    assert a.dtype == torch.bfloat16 and not torch.equal(a, down), "diffusers rescaled the bf16 down"
    assert (b.float() @ a.float() - exact).abs().max() > 0, "and the rounding changed the delta"
    ours = lora_from_state_dict(sd).components["transformer"]["transformer_blocks.0.attn.to_out.0"]
    assert ours.down is down and ours.up is up and ours.alpha == float(sd[f"{key}.alpha"])
    assert torch.equal(delta(ours), exact)


def test_split_of_a_lokr_row_selection_selects_rows_of_its_rows():
    from loraloom.lora.dit_keys import split_module

    gen = torch.Generator().manual_seed(9)
    lokr = LoKrModule(alpha=1.0, w1=torch.randn(3, 2, generator=gen), w2=torch.randn(10, 4, generator=gen))  # 30 x 8
    full = delta(lokr)
    swapped = split_module(lokr, ((2, 3), (0, 2)), "k")  # rows 16..24 then 0..16 (units of 8)
    assert swapped.rows == ((16, 24), (0, 16)) and torch.equal(delta(swapped), torch.cat([full[16:24], full[0:16]]))
    inner = split_module(swapped, ((0, 2),), "k")  # its first 16 rows: 16..24 and 0..8 of the product
    assert inner.rows == ((16, 24), (0, 8)) and torch.equal(delta(inner), torch.cat([full[16:24], full[0:8]]))
