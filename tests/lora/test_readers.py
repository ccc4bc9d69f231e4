"""Reading, detection, name mapping, writing and round trips of the LoRA format layer."""
from __future__ import annotations

import json

import pytest
import torch

from loraloom.lora import keymap, writers
from loraloom.lora.canonical import LoHaModule, LoKrModule, LoRA, LoRAModule, delta
from loraloom.lora.errors import LoRAFormatError, LoRAMatchError
from loraloom.fixtures import write_fixtures
from loraloom.lora.keymap import UNetLayout, kohya_module_name, kohya_names_to_paths
from loraloom.lora.match import base_spec, check_lora, match_lora
from loraloom.lora.readers import lora_from_state_dict, read_lora
from loraloom.lora.writers import write_diffusers, write_kohya

PRESETS = ("tiny-sd15", "tiny-sdxl")
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


@pytest.fixture(scope="module")
def specs():
    from loraloom.bases.presets import build_pipeline

    return {p: base_spec(build_pipeline(p, dtype="fp32", device="cpu")) for p in PRESETS}


# ------------------------------------------------------------------------------- reading


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


def test_fixtures_are_deterministic(lora_files, tmp_path):
    again = write_fixtures(tmp_path, presets=("tiny-sd15",))
    for name, path in again.items():
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        originals = sorted(lora_files[name].iterdir()) if path.is_dir() else [lora_files[name]]
        for new, old in zip(files, originals):
            assert new.read_bytes() == old.read_bytes(), f"{name}: {new.name} differs between two runs"


# ------------------------------------------------------------------------------- errors


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
        (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], "Flux"),
        (["foo.bar"], "unknown LoRA key format"),
        (["lora_unet_conv_in.lora_down.weight", "unet.conv_in.lora_A.weight"], "mixed"),
        (["lora_unet_conv_in.lora_down.weight"], "no up"),
    ],
)
def test_refuses_with_clear_errors(keys, match):
    with pytest.raises(LoRAFormatError, match=match):
        lora_from_state_dict({k: torch.zeros(4, 4) for k in keys}, path="x.safetensors")


def test_sdxl_lora_on_sd15_base_names_sdxl(lora_files, specs):
    lora = read_lora(lora_files["tiny-sdxl/kohya"])
    with pytest.raises(LoRAMatchError) as info:
        check_lora(lora, specs["tiny-sd15"])
    text = str(info.value)
    assert "looks made for SDXL" in text and "lora_te2_" in text, text
    assert "Fix: load it on an SDXL base" in text
    assert info.value.report.unmatched, "the report lists every unmatched module"


def test_sd15_lora_on_sdxl_base_names_sd15(lora_files, specs):
    with pytest.raises(LoRAMatchError, match="looks made for SD1.5"):
        check_lora(read_lora(lora_files["tiny-sd15/locon"]), specs["tiny-sdxl"])


def test_shape_mismatch_is_caught_before_the_model(specs):
    sd = {
        "lora_unet_conv_in.lora_down.weight": torch.zeros(4, 5, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 4, 1, 1),
    }
    with pytest.raises(LoRAMatchError, match=r"conv_in.*5 -> 8.*4 -> 8"):
        check_lora(lora_from_state_dict(sd), specs["tiny-sd15"])


def test_cross_architecture_shapes_are_reported(lora_files, specs):
    lora = read_lora(lora_files["tiny-sdxl/kohya"])
    report = match_lora(lora, specs["tiny-sd15"])
    assert report.total == lora.n_modules and report.mismatched and report.unmatched, report.summary()
    assert report.lora_arch == "sdxl" and report.base_arch == "sd15"
    with pytest.raises(LoRAMatchError, match="do not fit the base's shapes.*looks made for SDXL"):
        check_lora(lora, specs["tiny-sd15"])


def test_min_fraction_allows_a_partial_match(lora_files, specs):
    lora = read_lora(lora_files["tiny-sd15/kohya"])
    extra = {**lora.components["unet"], "some_block.not_in_base": next(iter(lora.components["unet"].values()))}
    partial = lora.replace(components={**lora.components, "unet": extra})
    with pytest.raises(LoRAMatchError, match="below the required 100%.*some_block.not_in_base"):
        check_lora(partial, specs["tiny-sd15"])
    report = check_lora(partial, specs["tiny-sd15"], min_fraction=0.9)
    assert report.unmatched[0][1] == "some_block.not_in_base" and report.fraction > 0.9


# ------------------------------------------------------------------------------- names


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("sgm", [False, True], ids=["diffusers-names", "sgm-names"])
def test_every_module_survives_kohya_naming(preset, sgm, specs):
    """All Linear/Conv2d modules of the real block layout: canonical -> kohya name -> diffusers'
    converter (+ our fixes) -> the same canonical path."""
    spec = specs[preset]
    layout = keymap.LAYOUTS["sdxl" if preset == "tiny-sdxl" else "sd15"]
    te_prefix = "lora_te1_" if preset == "tiny-sdxl" else "lora_te_"
    want = {}
    for component, modules in spec.components.items():
        for path in modules:
            if component != "unet" and "embeddings" in path:
                continue
            name = kohya_module_name(component, path, te_prefix=te_prefix, sgm_layout=layout if sgm else None)
            want[name] = (component, path)
    got = kohya_names_to_paths(want)
    wrong = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != v}
    assert not wrong, f"{len(wrong)} names mapped wrong, e.g. {list(wrong.items())[:3]}"


def test_layout_from_config_matches_presets(specs):
    from loraloom.lora.keymap import LAYOUTS
    from loraloom.bases.presets import preset_configs

    for preset, arch in (("tiny-sd15", "sd15"), ("tiny-sdxl", "sdxl")):
        assert UNetLayout.from_config(preset_configs(preset)["unet"]) == LAYOUTS[arch]


@pytest.mark.parametrize(
    "names, why",
    [
        (["lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_10_0_in_layers_2"], "substring"),
        (["lora_unet_output_blocks_2_1_conv"], "upsampler at inner index 1"),
        (["lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2"], "add_embedding index"),
    ],
)
def test_diffusers_converter_bugs_we_work_around(names, why):
    """diffusers' own converter alone gets these wrong; if this fails, diffusers fixed it and the
    matching workaround in keymap can go."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    sd = {}
    for i, n in enumerate(names):
        sd[f"{n}.lora_down.weight"] = torch.tensor(float(i))
        sd[f"{n}.lora_up.weight"] = torch.tensor(float(i))
    try:
        mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), SimpleNamespace(layers_per_block=2))
        out, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
        broken = len(out) != len(sd) or any("attentions" in k for k in out)
    except (KeyError, ValueError):
        broken = True
    assert broken, f"diffusers now handles {why}"
    ours = kohya_names_to_paths(names)
    assert len(set(ours.values())) == len(names), ours


# ------------------------------------------------------------------------------- writing


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


# ------------------------------------------------------------------------------- maths


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
