"""Per-block LoRA weights: the block of every UNet module (checked against diffusers' own SGM/LDM
converter and the real tiny UNets) and of every Flux / SD3.5 transformer module (against the real
tiny transformers), every accepted notation with written-out expectations, the diffusers dict form
against diffusers' `set_adapters`, and the refusals.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from loraloom.lora import blocks
from loraloom.lora.blocks import (
    MAX_ABS_WEIGHT,
    PRESETS,
    BlockWeightError,
    BlockWeights,
    block_of,
    block_scales,
    block_table,
    block_units,
    parse_block_weights,
)

# --------------------------------------------------------------------------- module -> block

SD15_MODULES = [
    ("unet", "conv_in", "IN00"),
    ("unet", "time_embedding.linear_1", "EMB"),
    ("unet", "time_embedding.linear_2", "EMB"),
    ("unet", "down_blocks.0.resnets.0.conv1", "IN01"),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "IN01"),
    ("unet", "down_blocks.0.resnets.1.time_emb_proj", "IN02"),
    ("unet", "down_blocks.0.attentions.1.proj_out", "IN02"),
    ("unet", "down_blocks.0.downsamplers.0.conv", "IN03"),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "IN04"),
    ("unet", "down_blocks.1.resnets.0.conv_shortcut", "IN04"),
    ("unet", "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj", "IN05"),
    ("unet", "down_blocks.1.downsamplers.0.conv", "IN06"),
    ("unet", "down_blocks.2.attentions.0.proj_in", "IN07"),
    ("unet", "down_blocks.2.resnets.1.conv2", "IN08"),
    ("unet", "down_blocks.2.downsamplers.0.conv", "IN09"),
    ("unet", "down_blocks.3.resnets.0.conv1", "IN10"),
    ("unet", "down_blocks.3.resnets.1.time_emb_proj", "IN11"),
    ("unet", "mid_block.resnets.0.conv1", "M00.0"),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", "M00.1"),
    ("unet", "mid_block.resnets.1.time_emb_proj", "M00.2"),
    ("unet", "up_blocks.0.resnets.0.conv1", "OUT00"),
    ("unet", "up_blocks.0.resnets.1.conv_shortcut", "OUT01"),
    ("unet", "up_blocks.0.resnets.2.conv2", "OUT02"),
    ("unet", "up_blocks.0.upsamplers.0.conv", "OUT02"),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v", "OUT03"),
    ("unet", "up_blocks.1.resnets.1.conv1", "OUT04"),
    ("unet", "up_blocks.1.attentions.2.proj_out", "OUT05"),
    ("unet", "up_blocks.1.upsamplers.0.conv", "OUT05"),
    ("unet", "up_blocks.2.attentions.0.proj_in", "OUT06"),
    ("unet", "up_blocks.2.upsamplers.0.conv", "OUT08"),
    ("unet", "up_blocks.3.resnets.0.time_emb_proj", "OUT09"),
    ("unet", "up_blocks.3.attentions.1.transformer_blocks.0.attn2.to_q", "OUT10"),
    ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "OUT11"),
    ("unet", "conv_norm_out", "FINAL"),
    ("unet", "conv_out", "FINAL"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", "TE1"),
    ("text_encoder", "encoder.layers.11.mlp.fc2", "TE1"),
]

SDXL_MODULES = [
    ("unet", "conv_in", "IN00"),
    ("unet", "time_embedding.linear_2", "EMB"),
    ("unet", "add_embedding.linear_1", "EMB"),
    ("unet", "add_embedding.linear_2", "EMB"),
    ("unet", "down_blocks.0.resnets.0.conv1", "IN01"),
    ("unet", "down_blocks.0.resnets.1.time_emb_proj", "IN02"),
    ("unet", "down_blocks.0.downsamplers.0.conv", "IN03"),
    ("unet", "down_blocks.1.resnets.0.conv_shortcut", "IN04"),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", "IN04"),
    ("unet", "down_blocks.1.attentions.1.proj_in", "IN05"),
    ("unet", "down_blocks.1.downsamplers.0.conv", "IN06"),
    ("unet", "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2", "IN07"),
    ("unet", "down_blocks.2.resnets.1.conv2", "IN08"),
    ("unet", "mid_block.resnets.0.time_emb_proj", "M00.0"),
    ("unet", "mid_block.attentions.0.transformer_blocks.5.attn2.to_v", "M00.1"),
    ("unet", "mid_block.resnets.1.conv1", "M00.2"),
    ("unet", "up_blocks.0.attentions.0.proj_out", "OUT00"),
    ("unet", "up_blocks.0.resnets.1.conv1", "OUT01"),
    ("unet", "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0", "OUT02"),
    ("unet", "up_blocks.0.upsamplers.0.conv", "OUT02"),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "OUT03"),
    ("unet", "up_blocks.1.resnets.2.conv_shortcut", "OUT05"),
    ("unet", "up_blocks.1.upsamplers.0.conv", "OUT05"),
    ("unet", "up_blocks.2.resnets.0.conv1", "OUT06"),
    ("unet", "up_blocks.2.resnets.1.time_emb_proj", "OUT07"),
    ("unet", "up_blocks.2.resnets.2.conv2", "OUT08"),
    ("unet", "conv_norm_out", "FINAL"),
    ("unet", "conv_out", "FINAL"),
    ("text_encoder", "encoder.layers.0.self_attn.k_proj", "TE1"),
    ("text_encoder_2", "text_projection", "TE2"),
    ("text_encoder_2", "encoder.layers.1.mlp.fc1", "TE2"),
]


@pytest.mark.parametrize("component, path, unit", SD15_MODULES)
def test_block_of_sd15(component, path, unit):
    assert block_of(component, path, "sd15") == unit, f"sd15 {component}.{path} should lie in {unit}"


@pytest.mark.parametrize("component, path, unit", SDXL_MODULES)
def test_block_of_sdxl(component, path, unit):
    assert block_of(component, path, "sdxl") == unit, f"sdxl {component}.{path} should lie in {unit}"


@pytest.mark.parametrize(
    "arch, component, path, words",
    [
        ("sd15", "unet", "add_embedding.linear_1", ["add_embedding.linear_1", "sd15"]),
        ("sd15", "unet", "down_blocks.3.downsamplers.0.conv", ["down_blocks.3.downsamplers.0.conv", "down_blocks.0-3"]),
        ("sd15", "unet", "down_blocks.3.attentions.0.proj_in", ["down_blocks.3.attentions.0.proj_in"]),
        ("sd15", "unet", "up_blocks.0.attentions.0.proj_in", ["up_blocks.0.attentions.0.proj_in"]),
        ("sd15", "unet", "up_blocks.3.upsamplers.0.conv", ["up_blocks.3.upsamplers.0.conv"]),
        ("sd15", "unet", "down_blocks.1.attentions.2.proj_in", ["attentions.2"]),
        ("sdxl", "unet", "down_blocks.0.attentions.0.proj_in", ["down_blocks.0.attentions.0.proj_in", "sdxl"]),
        ("sdxl", "unet", "down_blocks.3.resnets.0.conv1", ["down_blocks.3", "down_blocks.0-2"]),
        ("sdxl", "unet", "up_blocks.2.attentions.0.proj_in", ["up_blocks.2.attentions.0"]),
        ("sdxl", "unet", "encoder_hid_proj", ["encoder_hid_proj"]),
        ("sd15", "text_encoder_2", "text_projection", ["text_encoder_2", "unet, text_encoder"]),
        ("sdxl", "vae", "decoder.conv_in", ["vae", "text_encoder_2"]),
        ("flux", "transformer", "transformer_blocks.19.attn.to_q", ["transformer_blocks.19", "transformer_blocks.0-18"]),
        ("flux", "transformer", "single_transformer_blocks.38.proj_mlp", ["single_transformer_blocks.0-37"]),
        ("sd3", "transformer", "single_transformer_blocks.0.proj_mlp", ["single_transformer_blocks.0", "sd3"]),
        ("flux", "unet", "conv_in", ["'unet'", "transformer, text_encoder, text_encoder_2"]),
        ("flux", "text_encoder_3", "x", ["text_encoder_3"]),
        ("sd15", "transformer", "transformer_blocks.0.attn.to_q", ["'transformer'", "unet, text_encoder"]),
    ],
)
def test_block_of_refuses_modules_the_arch_lacks(arch, component, path, words):
    with pytest.raises(BlockWeightError) as err:
        block_of(component, path, arch)
    for word in words:
        assert word in str(err.value), f"error should name {word!r}: {err.value}"


def test_unknown_arch_lists_the_valid_ones():
    with pytest.raises(BlockWeightError, match="sd15, sdxl, flux, sd3"):
        block_of("unet", "conv_in", "sd2")
    with pytest.raises(BlockWeightError, match="sd15, sdxl, flux, sd3"):
        parse_block_weights("ALL", "sd21")


# Every SGM/LDM block-level name of the original UNets, written from the LDM layout: input block
# 0 is conv_in; each level has 2 resnet(+attention) slots and a downsampler slot (none after the
# last level); the middle block is resnet, attention, resnet; output levels have 3 slots and the
# upsampler in the last. Upsamplers are named with inner index 2 because that is the index
# diffusers' LoRA converter maps to upsamplers (SD1.5's first up level really has it at index 1).
def _sgm_names(levels_in, attention_in, attention_out, levels_out):
    names = ["input_blocks_0_0"]
    for level in range(levels_in):
        for j in range(2):
            n = 1 + 3 * level + j
            names.append(f"input_blocks_{n}_0_in_layers_2")
            if attention_in[level]:
                names.append(f"input_blocks_{n}_1_proj_in")
        if level < levels_in - 1:
            names.append(f"input_blocks_{3 + 3 * level}_0_op")
    names += ["middle_block_0_emb_layers_1", "middle_block_1_proj_out", "middle_block_2_in_layers_2"]
    for level in range(levels_out):
        for j in range(3):
            n = 3 * level + j
            names.append(f"output_blocks_{n}_0_skip_connection")
            if attention_out[level]:
                names.append(f"output_blocks_{n}_1_proj_out")
        if level < levels_out - 1:
            names.append(f"output_blocks_{3 * level + 2}_2_conv")
    return names


SGM_NAMES = {
    "sd15": _sgm_names(4, (True, True, True, False), (False, True, True, True), 4),
    "sdxl": _sgm_names(3, (False, True, True), (True, True, False), 3),
}


def _ldm_block(sgm_name: str) -> str:
    kind, number = re.match(r"(input_blocks|middle_block|output_blocks)_(\d+)_", sgm_name).groups()
    return {"input_blocks": f"IN{int(number):02d}", "middle_block": f"M00.{number}", "output_blocks": f"OUT{int(number):02d}"}[kind]


def _diffusers_path(sgm_name: str) -> str:
    """The diffusers module path diffusers' own kohya/SGM LoRA converter gives an SGM name."""
    import torch
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    key = f"lora_unet_{sgm_name}"
    state = {f"{key}.lora_down.weight": torch.zeros(1, 1), f"{key}.lora_up.weight": torch.zeros(1, 1)}
    # one key per call: the converter groups keys by substring (input_blocks_1 would take _10, _11)
    state = _maybe_map_sgm_blocks_to_diffusers(state, SimpleNamespace(layers_per_block=2))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    (path,) = {k.removeprefix("unet.").rsplit(".lora.", 1)[0] for k in converted}
    return path


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_blocks_agree_with_diffusers_sgm_converter(arch):
    """For every block-level SGM name, diffusers' converter gives a module path we place in the
    block the SGM name numbers; together they reach every prefix of our table."""
    reached = set()
    for name in SGM_NAMES[arch]:
        path = _diffusers_path(name)
        assert block_of("unet", path, arch) == _ldm_block(name), (
            f"{arch}: diffusers maps SGM {name} to {path}, which we place in {block_of('unet', path, arch)}"
        )
        reached.add(".".join(path.split(".")[: 3 if path.startswith("mid_block") else 4]))
    table = block_table(arch)
    blockwise = {p for p in table if table[p] not in ("EMB", "FINAL")}
    assert reached == blockwise, f"{arch}: prefixes not reached {blockwise - reached}, unexpected {reached - blockwise}"


def _build_unet(arch: str):
    from diffusers import UNet2DConditionModel

    from loraloom.bases.presets import preset_configs

    return UNet2DConditionModel(**preset_configs(f"tiny-{arch}")["unet"])


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny_unet(request):
    """(arch, UNet2DConditionModel) with the real block structure of the tiny preset; read only."""
    return request.param, _build_unet(request.param)


def test_every_unet_layer_has_a_block(tiny_unet):
    import torch

    arch, unet = tiny_unet
    names = {name for name, _ in unet.named_modules()}
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    units = {block_of("unet", n, arch) for n in layers}
    unet_units = {u for u in block_units(arch) if not u.startswith("TE")}
    assert units == unet_units, f"{arch}: units without layers {unet_units - units}, unknown {units - unet_units}"
    missing = [p for p in block_table(arch) if p not in names]
    assert not missing, f"{arch}: table prefixes that are no module of the real layout: {missing}"


# --------------------------------------------------------------------------- lbw vectors

SD15_ALL = "TE1 EMB IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 IN09 IN10 IN11 M00.0 M00.1 M00.2 " \
    "OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11 FINAL".split()
SDXL_ALL = "TE1 TE2 EMB IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 M00.0 M00.1 M00.2 " \
    "OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 FINAL".split()
BASE = {"sd15": ["TE1", "EMB", "FINAL"], "sdxl": ["TE1", "TE2", "EMB", "FINAL"]}
MID = ["M00.0", "M00.1", "M00.2"]

# The blocks of each position, written out (A1111's BLOCKID lists; Inspire Pack's LyCORIS presets).
LAYOUT_BLOCKS = {
    ("sd15", 17): "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11",
    ("sd15", 26): "BASE IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 IN09 IN10 IN11 M00 "
    "OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11",
    ("sd15", 27): "BASE IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 IN09 IN10 IN11 M00.0 M00.1 M00.2 "
    "OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11",
    ("sdxl", 12): "BASE IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05",
    ("sdxl", 20): "BASE IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08",
    ("sdxl", 21): "BASE IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 M00.0 M00.1 M00.2 "
    "OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08",
}


@pytest.mark.parametrize("arch, count", list(LAYOUT_BLOCKS))
def test_lbw_vector_of_each_accepted_length(arch, count):
    positions = LAYOUT_BLOCKS[arch, count].split()
    assert len(positions) == count
    values = [round(0.1 * (i + 1), 1) for i in range(count)]
    text = ", ".join(f"{v:g}" for v in values)
    expected = dict.fromkeys(SD15_ALL if arch == "sd15" else SDXL_ALL, 0.0)  # unlisted blocks: 0
    for block, v in zip(positions, values):
        for unit in {"BASE": BASE[arch], "M00": MID}.get(block, [block]):
            expected[unit] = v
    got = parse_block_weights(text, arch).weights
    assert got == pytest.approx(expected), f"{arch} {count} values: {got}"


def test_lbw_17_written_out():
    """The 17-value SD1.5 layout in full: blocks it leaves out are 0, EMB and FINAL follow BASE."""
    got = parse_block_weights("0.5,1,2,3,4,5,6,7,8,9,-1,-2,-3,-4,-5,-6,-7", "sd15").weights
    assert got == {
        "TE1": 0.5, "EMB": 0.5, "IN00": 0, "IN01": 1, "IN02": 2, "IN03": 0, "IN04": 3, "IN05": 4, "IN06": 0,
        "IN07": 5, "IN08": 6, "IN09": 0, "IN10": 0, "IN11": 0, "M00.0": 7, "M00.1": 7, "M00.2": 7,
        "OUT00": 0, "OUT01": 0, "OUT02": 0, "OUT03": 8, "OUT04": 9, "OUT05": -1, "OUT06": -2, "OUT07": -3,
        "OUT08": -4, "OUT09": -5, "OUT10": -6, "OUT11": -7, "FINAL": 0.5,
    }


def test_lbw_text_forms():
    ref = parse_block_weights("OUTD", "sd15")
    assert parse_block_weights("lbw=OUTD", "sd15") == ref, "the lbw= prefix of A1111's prompt syntax is dropped"
    assert parse_block_weights("outd", "sd15") == ref, "preset names match ignoring case"
    assert parse_block_weights(" MINE : 1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0\n", "sd15") == ref, "a preset-file line"
    assert parse_block_weights("1, 0,0 ,0,0,0,0,0,\n1,1,1,1,0,0,0,0,0", "sd15") == ref, "spaces and newlines"
    assert parse_block_weights("1,0,0,0,0,0,0,0,1.0,1e0,+1,1.,0,0,0,0,0", "sd15") == ref, "number spellings"


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_parses(name):
    preset = PRESETS[name]
    count = len(preset.values.split(","))
    assert count in blocks.LBW_LAYOUTS[preset.arch], f"{name}: {count} values is no {preset.arch} layout"
    if "R" in preset.values.split(","):
        with pytest.raises(BlockWeightError, match="random"):
            parse_block_weights(name, preset.arch)
        return
    weights = parse_block_weights(name, preset.arch, a=4.0, b=1.0)
    assert weights.arch == preset.arch and name in weights.source, weights.source


def test_preset_values_written_out():
    outd = parse_block_weights("OUTD", "sd15").weights
    on = {"TE1", "EMB", "FINAL", "OUT03", "OUT04", "OUT05", "OUT06"}
    assert outd == {u: 1.0 if u in on else 0.0 for u in SD15_ALL}, outd
    midall = parse_block_weights("SDXL-MIDALL", "sdxl").weights
    on = {"TE1", "TE2", "EMB", "FINAL", *MID}
    assert midall == {u: 1.0 if u in on else 0.0 for u in SDXL_ALL}, midall
    lyc_mid = parse_block_weights("SD-LyC-MIDALL", "sd15").weights
    on = {"TE1", "EMB", "FINAL", *MID}
    assert lyc_mid == {u: 1.0 if u in on else 0.0 for u in SD15_ALL}, lyc_mid
    ab = parse_block_weights("SD-AB", "sd15", a=4.0, b=1.0).weights
    assert ab["TE1"] == 4.0 and ab["IN01"] == 1.0 and ab["M00.1"] == 1.0 and ab["OUT07"] == 4.0, ab
    half = parse_block_weights("a,b,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "sd15", a=3.0, b=-1.0).weights
    assert half["TE1"] == 1.5 and half["IN01"] == -0.5, "lowercase letters are half of A and B"


def test_equal_tables_compare_equal():
    a1111, inspire = parse_block_weights("ALL", "sd15"), parse_block_weights("SD-ALL", "sd15")
    assert a1111 == inspire and hash(a1111) == hash(inspire), "the same table from two spellings"
    assert a1111.source != inspire.source
    assert not a1111.is_identity, "17 ones leave IN00, IN03, IN06, IN09-IN11, OUT00-OUT02 at 0 as in A1111"
    assert parse_block_weights(",".join(["1"] * 26), "sd15").is_identity, "26 ones are the identity"
    assert parse_block_weights("", "sd15").is_identity and parse_block_weights(None, "sdxl").is_identity
    assert parse_block_weights({}, "sdxl").is_identity


def test_describe_joins_runs():
    assert parse_block_weights("OUTD", "sd15").describe() == (
        "TE1=1, EMB=1, IN00-IN11=0, M00.0-M00.2=0, OUT00-OUT02=0, OUT03-OUT06=1, OUT07-OUT11=0, FINAL=1"
    )


# --------------------------------------------------------------------------- refusals


def _raises(spec, arch="sd15", **kwargs) -> str:
    with pytest.raises(BlockWeightError) as err:
        parse_block_weights(spec, arch, **kwargs)
    return str(err.value)


def test_wrong_count_names_count_and_layouts():
    message = _raises(",".join(["1"] * 18))
    for word in ["18 values", "17 = ", "26 = ", "27 = ", "BASE, IN01, IN02, IN04", "Inspire Pack LyCORIS"]:
        assert word in message, f"missing {word!r}: {message}"
    message = _raises(",".join(["1"] * 12))
    assert "12 values is a sdxl layout" in message, message
    message = _raises(",".join(["1"] * 17), "sdxl")
    assert "12 = " in message and "20 = " in message and "21 = " in message and "sd15 layout" in message, message
    assert "1 values" in _raises("0.5")


@pytest.mark.parametrize(
    "token, words",
    [
        ("nan", ["value 3 (IN02)", "not a number"]),
        ("1e400", ["value 3 (IN02)", "not finite"]),
        ("10.5", ["value 3 (IN02)", "10.5", "limit of +-10"]),
        ("-11", ["-11", "limit"]),
        ("1_0", ["not a number"]),
        ("R", ["random", "Fix: replace it with a number"]),
        ("u", ["random"]),
        ("X+0.5", ["A1111's X", "x="]),
        ("1 0.5", ["sub-vector"]),
        ("", ["value 3 (IN02) is empty"]),
        ("A", ["letter", "Fix: pass a=<number>"]),
        ("b", ["B value halved", "pass b="]),
        ("1..0", ["not a number"]),
    ],
)
def test_bad_values_are_refused(token, words):
    values = ["1"] * 17
    values[2] = token
    message = _raises(",".join(values))
    for word in words:
        assert word in message, f"{token!r}: missing {word!r} in {message}"


def test_limits():
    assert parse_block_weights(",".join([f"{MAX_ABS_WEIGHT:g}"] * 17), "sd15").weights["IN01"] == MAX_ABS_WEIGHT
    assert "limit" in _raises("A" + ",1" * 16, a=20.0), "a letter's value is checked too"


def test_unknown_and_foreign_presets():
    message = _raises("EVERYTHING")
    assert "unknown block-weight preset 'EVERYTHING'" in message and "OUTALL" in message and "SD-LyC-ALL" in message
    assert "SDXL-ALL" not in message, "only presets for the arch are listed"
    message = _raises("ALL", "sdxl")
    assert "'ALL'" in message and "is for sd15, not sdxl" in message and "SDXL-ALL" in message, message
    assert "is for sdxl" in _raises("SDXL-NONE", "sd15")
    assert "is for flux, not sd15" in _raises("FLUX-DBL-FRONT")
    assert "unknown" in _raises("FLUX-DBL-EVERYTHING", "flux")


def test_inspire_percent_spec_is_refused():
    message = _raises("%default=1,in=0.5")
    assert "% block spec" in message and "Fix:" in message, message


def test_wrong_types_are_refused():
    assert "text or a dict" in _raises(0.5)
    assert "text or a dict" in _raises(["1"] * 17)
    assert "for sd15 used on sdxl" in _raises(parse_block_weights("ALL", "sd15"), "sdxl")


# --------------------------------------------------------------------------- dict forms


def test_diffusers_dict_written_out():
    spec = {"unet": {"down": 0, "mid": 0.5, "up": {"block_0": [1, 0, 2]}}, "text_encoder": 0.5}
    got = parse_block_weights(spec, "sdxl").weights
    expected = dict.fromkeys(SDXL_ALL, 1.0)
    expected.update(dict.fromkeys([f"IN{i:02d}" for i in range(1, 9)], 0.0))  # conv_in is not in "down"
    expected.update({"M00.0": 0.5, "M00.1": 0.5, "M00.2": 0.5, "OUT00": 1.0, "OUT01": 0.0, "OUT02": 2.0, "TE1": 0.5})
    assert got == expected, got

    got = parse_block_weights({"unet": {"down": {"block_1": [2, 3]}, "up": [0.5]}}, "sd15").weights
    expected = dict.fromkeys(SD15_ALL, 1.0)
    expected.update({"IN04": 2.0, "IN05": 3.0, "IN06": 3.0})  # the downsampler follows the last layer
    expected.update({f"OUT{i:02d}": 0.5 for i in range(12)})  # a 1-list is broadcast, as in diffusers
    assert got == expected, got

    got = parse_block_weights({"unet": 0.3, "text_encoder_2": 0}, "sdxl").weights
    assert got == {u: (1.0 if u == "TE1" else 0.0 if u == "TE2" else 0.3) for u in SDXL_ALL}, got


@pytest.mark.parametrize(
    "spec, arch, words",
    [
        ({"unet": {"middle": 1}}, "sd15", ["unknown key(s) ['middle']", "down, mid, up"]),
        ({"unet": {"down": {"block_4": 1}}}, "sd15", ["block_4", "block_0, block_1, block_2, block_3"]),
        ({"unet": {"down": {"block_3": 1}}}, "sdxl", ["block_3", "block_0, block_1, block_2"]),
        ({"unet": {"up": {"block_1": [1, 0]}}}, "sd15", ["unet.up.block_1", "2 scales", "expected 3"]),
        ({"unet": {"mid": [1, 2]}}, "sd15", ["unet.mid", "expected 1"]),
        ({"unet": {"down": {"block_0": [1, "x"]}}}, "sd15", ["unet.down.block_0[1]", "not a number"]),
        ({"text_encoder": {"layers": 1}}, "sd15", ["text_encoder", "not a number"]),
        ({"text_encoder_2": 1}, "sd15", ["text_encoder_2", "unet, text_encoder"]),
        ({"unet": 1, "IN04": 0}, "sd15", ["mixed"]),
        ({"IN12": 0}, "sd15", ["IN12", "BASE, M00, TE1"]),
        ({"TE2": 0}, "sd15", ["TE2"]),
        ({"M00": True}, "sd15", ["True", "not a number"]),
        ({"unet": float("nan")}, "sd15", ["not finite"]),
        ({"unet": -12}, "sdxl", ["limit"]),
    ],
)
def test_bad_dicts_are_refused(spec, arch, words):
    message = _raises(spec, arch)
    for word in words:
        assert word in message, f"{spec}: missing {word!r} in {message}"


def test_unit_dict_aliases_then_units():
    got = parse_block_weights({"M00.1": 2, "EMB": 1, "BASE": 0, "M00": 0.5}, "sdxl").weights
    expected = dict.fromkeys(SDXL_ALL, 1.0)
    expected.update({"TE1": 0, "TE2": 0, "FINAL": 0, "M00.0": 0.5, "M00.1": 2, "M00.2": 0.5})
    assert got == expected, got


def test_json_text():
    spec = {"unet": {"down": 0, "mid": 0.5, "up": {"block_0": [1, 0, 2]}}, "text_encoder": 0.5}
    assert parse_block_weights(json.dumps(spec), "sdxl") == parse_block_weights(spec, "sdxl")
    assert parse_block_weights('{"IN04": 0}', "sd15").weights["IN04"] == 0.0
    assert "names 'IN04' twice" in _raises('{"IN04": 0, "IN04": 1}')
    assert "does not parse" in _raises('{"IN04": }')
    assert "not finite" in _raises('{"IN04": NaN}')
    assert "does not parse" in _raises('{"IN04": ' + "[" * 50_000 + "]" * 50_000 + "}"), "deeper than Python's stack"
    assert "does not parse" in _raises('{"IN04": ' + "9" * 5000 + "}"), "more digits than int() takes"


# --------------------------------------------------------------------------- against diffusers


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def diffusers_scales(request):
    """arch, and a function spec -> {module: scale} as diffusers' own `set_adapters` sets them on
    a LoRA over attention, resnet and resampler layers of a tiny UNet of its own."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    arch, unet = request.param, _build_unet(request.param)
    targets = ["to_q", "to_k", "proj_in", "ff.net.2", "conv1", "time_emb_proj", "conv"]
    unet.add_adapter(LoraConfig(r=1, lora_alpha=1, target_modules=targets), adapter_name="x")

    def scales(spec):
        unet.set_adapters(["x"], [spec])
        return {n: m.scaling["x"] for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}

    return arch, scales


DIFFUSERS_SPECS = {
    "sdxl": {"down": 0, "mid": 0.5, "up": {"block_0": [1, 0, 2]}},
    "sd15": {"down": {"block_1": [2, 3]}, "mid": 0.5, "up": {"block_1": [4, 5, 6], "block_3": 0.25}},
}


def test_diffusers_dict_matches_diffusers_and_covers_the_rest(diffusers_scales):
    arch, scales = diffusers_scales
    spec = DIFFUSERS_SPECS[arch]
    theirs = scales(spec)
    ours = block_scales({"unet": spec}, arch, {"unet": list(theirs)})["unet"]
    attention_blocks = {".".join(p.split(".")[:2]) for p in theirs if ".attentions." in p and p.startswith(("down", "up"))}
    compared = 0
    for path, scale in theirs.items():
        block = ".".join(path.split(".")[:2])
        if ".attentions." in path or (".resnets." in path and block in attention_blocks):
            assert ours[path] == pytest.approx(scale), f"{arch} {path}: ours {ours[path]}, diffusers {scale}"
            compared += 1
    assert compared > 20, f"only {compared} layers compared"
    # where diffusers leaves 1.0, ours applies the block's value
    assert {theirs[p] for p in theirs if p.startswith("mid_block.resnets")} == {1.0}
    assert {ours[p] for p in ours if p.startswith("mid_block.resnets")} == {0.5}
    if arch == "sdxl":
        assert {theirs[p] for p in theirs if p.startswith("down_blocks.0.")} == {1.0}
        assert {ours[p] for p in ours if p.startswith("down_blocks.0.")} == {0.0}, "attention-less block 0 is in 'down'"
        assert ours["up_blocks.0.upsamplers.0.conv"] == 2.0, "the upsampler follows the last layer of its block"
    else:
        assert ours["up_blocks.3.resnets.2.conv1"] == 0.25 and ours["down_blocks.1.downsamplers.0.conv"] == 3.0


# --------------------------------------------------------------------------- block_scales


def test_block_scales_per_module():
    modules = {
        "unet": ["conv_in", "down_blocks.0.downsamplers.0.conv", "mid_block.resnets.1.conv1", "up_blocks.1.attentions.0.proj_in"],
        "text_encoder": ["encoder.layers.0.self_attn.q_proj"],
    }
    got = block_scales("0.5,1,1,1,1,1,1,0.25,2,1,1,1,1,1,1,1,1", "sd15", modules)
    assert got == {
        "unet": {
            "conv_in": 0.0,  # IN00 is not in the 17-value layout
            "down_blocks.0.downsamplers.0.conv": 0.0,  # nor IN03
            "mid_block.resnets.1.conv1": 0.25,
            "up_blocks.1.attentions.0.proj_in": 2.0,
        },
        "text_encoder": {"encoder.layers.0.self_attn.q_proj": 0.5},
    }, got
    assert block_scales(None, "sd15", modules)["unet"]["conv_in"] == 1.0
    weights = parse_block_weights({"IN00": 3}, "sd15")
    assert block_scales(weights, "sd15", modules)["unet"]["conv_in"] == 3.0
    with pytest.raises(BlockWeightError, match="down_blocks.4.resnets.0.conv1"):
        block_scales("ALL", "sd15", {"unet": ["down_blocks.4.resnets.0.conv1"]})


def test_blocks_module_does_not_import_torch():
    code = "import sys, loraloom.lora.blocks; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "lora/blocks.py should stay torch-free"


def test_block_weights_rejects_a_wrong_length():
    with pytest.raises(BlockWeightError, match="3 values for the 30 units of sd15"):
        BlockWeights("sd15", (1.0, 1.0, 1.0))
    with pytest.raises(BlockWeightError, match="IN00: inf is not finite"):
        BlockWeights("sd15", (1.0, 1.0, float("inf")) + (1.0,) * 27)


# --------------------------------------------------------------------------- DiTs (Flux, SD3.5)

FLUX_ALL = ["TE1", "TE2", "EMB", *[f"D{i:02d}" for i in range(19)], *[f"S{i:02d}" for i in range(38)], "FINAL"]
SD3_ALL = ["TE1", "TE2", "TE3", "EMB", *[f"J{i:02d}" for i in range(38)], "FINAL"]

DIT_MODULES = [
    ("flux", "transformer", "x_embedder", "EMB"),
    ("flux", "transformer", "context_embedder", "EMB"),
    ("flux", "transformer", "time_text_embed.guidance_embedder.linear_1", "EMB"),
    ("flux", "transformer", "time_text_embed.text_embedder.linear_2", "EMB"),
    ("flux", "transformer", "transformer_blocks.0.attn.to_q", "D00"),
    ("flux", "transformer", "transformer_blocks.18.ff_context.net.2", "D18"),
    ("flux", "transformer", "transformer_blocks.7.norm1_context.linear", "D07"),
    ("flux", "transformer", "single_transformer_blocks.0.proj_mlp", "S00"),
    ("flux", "transformer", "single_transformer_blocks.37.proj_out", "S37"),
    ("flux", "transformer", "single_transformer_blocks.12.attn.to_k", "S12"),
    ("flux", "transformer", "norm_out.linear", "FINAL"),
    ("flux", "transformer", "proj_out", "FINAL"),
    ("flux", "text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", "TE1"),
    ("flux", "text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q", "TE2"),
    ("sd3", "transformer", "pos_embed.proj", "EMB"),
    ("sd3", "transformer", "time_text_embed.timestep_embedder.linear_1", "EMB"),
    ("sd3", "transformer", "transformer_blocks.0.attn.add_q_proj", "J00"),
    ("sd3", "transformer", "transformer_blocks.37.ff.net.2", "J37"),
    ("sd3", "transformer", "norm_out.linear", "FINAL"),
    ("sd3", "text_encoder_3", "encoder.block.1.layer.1.DenseReluDense.wo", "TE3"),
]


@pytest.mark.parametrize("arch, component, path, unit", DIT_MODULES)
def test_block_of_dit(arch, component, path, unit):
    assert block_of(component, path, arch) == unit, f"{arch} {component}.{path} should lie in {unit}"


@pytest.mark.parametrize("preset, arch", [("tiny-flux", "flux"), ("tiny-sd3", "sd3")])
def test_every_transformer_layer_has_a_block(preset, arch):
    """The real transformer classes at the presets' (real) block counts: every weight layer lies in a
    unit, every unit of the denoiser has layers, every table prefix is a module."""
    import diffusers
    import torch

    from loraloom.bases.presets import preset_configs
    from loraloom.lora.arches import ARCHES as LAYOUTS

    model = getattr(diffusers, LAYOUTS[arch].denoiser_class)(**preset_configs(preset)["transformer"])
    names = {name for name, _ in model.named_modules()}
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    units = {block_of("transformer", n, arch) for n in layers}
    denoiser_units = {u for u in block_units(arch) if not u.startswith("TE")}
    assert units == denoiser_units, f"{arch}: units without layers {denoiser_units - units}, unknown {units - denoiser_units}"
    # Flux's pos_embed has no weights; SD3 has no x_embedder (its pos_embed is the patch embedding)
    absent = {"flux": {"pos_embed"}, "sd3": {"x_embedder"}}[arch]
    missing = [p for p in block_table(arch) if p not in names and p not in absent]
    assert not missing, f"{arch}: table prefixes that are no module of the real layout: {missing}"


def test_flux_inspire_vector_written_out():
    """58 values: BASE, D00-D18, S00-S37; BASE also sets both text encoders, EMB and FINAL."""
    values = [0.5] + [round(0.1 * i, 1) for i in range(19)] + [-0.25 * i for i in range(38)]
    got = parse_block_weights(",".join(f"{v:g}" for v in values), "flux").weights
    expected = {"TE1": 0.5, "TE2": 0.5, "EMB": 0.5, "FINAL": 0.5}
    expected.update({f"D{i:02d}": round(0.1 * i, 1) for i in range(19)})
    expected.update({f"S{i:02d}": -0.25 * i for i in range(38)})
    assert got == pytest.approx(expected) and list(got) == FLUX_ALL, got


def test_flux_a1111_vector_written_out():
    """61 values, A1111's BLOCKIDFLUX order: CLIP, T5, IN, D00-D18, S00-S37, OUT."""
    values = [0.1, 0.2, 0.3] + [1.0] * 19 + [0.0] * 38 + [0.4]
    got = parse_block_weights(",".join(map(str, values)), "flux").weights
    assert (got["TE1"], got["TE2"], got["EMB"], got["FINAL"]) == (0.1, 0.2, 0.3, 0.4), got
    assert {got[f"D{i:02d}"] for i in range(19)} == {1.0} and {got[f"S{i:02d}"] for i in range(38)} == {0.0}


def test_sd3_vector_written_out():
    values = [2.0] + [float(i) / 10 for i in range(38)]
    got = parse_block_weights(",".join(map(str, values)), "sd3").weights
    expected = {"TE1": 2.0, "TE2": 2.0, "TE3": 2.0, "EMB": 2.0, "FINAL": 2.0}
    expected.update({f"J{i:02d}": i / 10 for i in range(38)})
    assert got == pytest.approx(expected) and list(got) == SD3_ALL, got


def test_dit_preset_values_written_out():
    base = {"TE1", "TE2", "EMB", "FINAL"}
    doubles = {f"D{i:02d}" for i in range(19)}
    singles = {f"S{i:02d}" for i in range(38)}
    on = {
        "FLUX-ALL": base | doubles | singles,
        "FLUXALL": base | doubles | singles,
        "FLUX-NONE": set(),
        "FLUX-DBL-ALL": base | doubles,
        "FLUX-SGL-ALL": base | singles,
        # Inspire Pack's 18-value lines as its loader spreads them over a LoRA with all 57 blocks
        "FLUX-DBL-FRONT": base | {f"D{i:02d}" for i in range(5)},
        "FLUX-DBL-MID": {f"D{i:02d}" for i in range(5, 11)},
        "FLUX-DBL-TAIL": {f"D{i:02d}" for i in range(11, 19)} | singles,
    }
    for name, units in on.items():
        got = parse_block_weights(name, "flux").weights
        assert got == {u: 1.0 if u in units else 0.0 for u in FLUX_ALL}, f"{name}: {got}"
    assert parse_block_weights("FLUX-ALL", "flux").is_identity and parse_block_weights("FLUXALL", "flux").is_identity
    sd3_base = {"TE1", "TE2", "TE3", "EMB", "FINAL"}
    for name, units in {
        "SD3-ALL": sd3_base | {f"J{i:02d}" for i in range(38)},
        "SD3-NONE": set(),
        "SD3-FRONT": sd3_base | {f"J{i:02d}" for i in range(19)},
        "SD3-TAIL": sd3_base | {f"J{i:02d}" for i in range(19, 38)},
    }.items():
        got = parse_block_weights(name, "sd3").weights
        assert got == {u: 1.0 if u in units else 0.0 for u in SD3_ALL}, f"{name}: {got}"
    assert parse_block_weights("flux-dbl-all", "flux") == parse_block_weights("FLUX-DBL-ALL", "flux")
    assert parse_block_weights("FLUX-DBL-ALL", "flux").describe() == "TE1-TE2=1, EMB=1, D00-D18=1, S00-S37=0, FINAL=1"


@pytest.mark.parametrize("count", [1, 19, 38, 57, 59, 60, 62])
def test_flux_wrong_count_names_the_expected_counts(count):
    message = _raises(",".join(["1"] * count), "flux")
    for word in [f"{count} values", "flux accepts 58 = Inspire Pack layout (BASE, D00-D18, S00-S37)",
                 "61 = A1111 Flux layout", "CLIP, T5, IN and OUT"]:
        assert word in message, f"missing {word!r}: {message}"
    with pytest.raises(BlockWeightError) as err:
        parse_block_weights(",".join(["1"] * count), "flux")
    assert (err.value.value, err.value.limit) == (count, (58, 61))
    assert ("without the leading BASE value" in message) == (count == 57), message


def test_dit_wrong_count_and_foreign_layouts():
    message = _raises(",".join(["1"] * 38), "sd3")
    assert "38 values; sd3 accepts 39 = joint-block layout (BASE, J00-J37)" in message, message
    assert "38 is one per block without the leading BASE value" in message, message
    assert "58 values is a flux layout: is the base model flux?" in _raises(",".join(["1"] * 58), "sd3")
    assert "17 values is a sd15 layout" in _raises(",".join(["1"] * 17), "flux")
    assert "is for sd15, not flux" in _raises("ALL", "flux") and "FLUX-DBL-ALL" in _raises("ALL", "flux")
    assert "is for flux, not sd3" in _raises("FLUX-ALL", "sd3")
    assert "for flux used on sd3" in _raises(parse_block_weights("FLUX-ALL", "flux"), "sd3")


def test_transformer_dict_written_out():
    spec = {"transformer": {"transformer_blocks": {"block_3": 0.5, "block_18": 2},
                            "single_transformer_blocks": 0}, "text_encoder_2": 0.25}
    got = parse_block_weights(spec, "flux").weights
    expected = dict.fromkeys(FLUX_ALL, 1.0)
    expected.update({"D03": 0.5, "D18": 2.0, "TE2": 0.25})
    expected.update({f"S{i:02d}": 0.0 for i in range(38)})
    assert got == expected, got
    assert parse_block_weights(json.dumps(spec), "flux") == parse_block_weights(spec, "flux")

    per_block = [i / 100 for i in range(38)]
    got = parse_block_weights({"transformer": {"transformer_blocks": per_block}, "text_encoder_3": 0}, "sd3").weights
    assert [got[f"J{i:02d}"] for i in range(38)] == per_block and got["TE3"] == 0.0 and got["EMB"] == 1.0, got
    got = parse_block_weights({"transformer": 0.3}, "sd3").weights
    assert got == {u: 1.0 if u.startswith("TE") else 0.3 for u in SD3_ALL}, "a number sets EMB, blocks and FINAL"
    got = parse_block_weights({"BASE": 0, "S07": 0.5, "TE1": 1}, "flux").weights
    assert (got["TE1"], got["TE2"], got["EMB"], got["FINAL"], got["S07"], got["S08"]) == (1, 0, 0, 0, 0.5, 1), got


@pytest.mark.parametrize(
    "spec, arch, words",
    [
        ({"transformer": {"double": 0}}, "flux", ["unknown key(s) ['double']", "transformer_blocks, single_transformer_blocks"]),
        ({"transformer": {"transformer_blocks": {"block_19": 0}}}, "flux", ["block_19", "block_0, block_1", "block_18"]),
        ({"transformer": {"transformer_blocks": [1, 0]}}, "flux", ["transformer.transformer_blocks", "2 scales",
                                                                   "expected 19 (one per block)"]),
        ({"transformer": {"single_transformer_blocks": [1]}}, "sd3", ["single_transformer_blocks", "transformer_blocks"]),
        ({"unet": 1}, "flux", ["unknown key(s) ['unet']", "transformer, text_encoder"]),
        ({"D19": 0}, "flux", ["D19", "D00-D18, S00-S37"]),
        ({"M00": 0}, "flux", ["M00"]),
        ({"transformer": {"transformer_blocks": {"block_0": "x"}}}, "sd3", ["transformer.transformer_blocks.block_0",
                                                                            "not a number"]),
    ],
)
def test_bad_transformer_dicts_are_refused(spec, arch, words):
    message = _raises(spec, arch)
    for word in words:
        assert word in message, f"{spec}: missing {word!r} in {message}"


def test_block_scales_on_flux_modules():
    modules = {"transformer": ["transformer_blocks.2.attn.to_q", "single_transformer_blocks.5.proj_mlp", "proj_out",
                               "context_embedder"],
               "text_encoder": ["text_model.encoder.layers.0.mlp.fc1"]}
    values = ["0.5"] + ["1"] * 19 + ["0"] * 38
    values[1 + 2] = "2"  # D02
    got = block_scales(",".join(values), "flux", modules)
    assert got == {"transformer": {"transformer_blocks.2.attn.to_q": 2.0, "single_transformer_blocks.5.proj_mlp": 0.0,
                                   "proj_out": 0.5, "context_embedder": 0.5},
                   "text_encoder": {"text_model.encoder.layers.0.mlp.fc1": 0.5}}, got
    lacking = {"transformer": ["transformer_blocks.0.attn.to_q"]}
    assert block_scales("FLUX-DBL-ALL", "flux", lacking) == {"transformer": {"transformer_blocks.0.attn.to_q": 1.0}}, \
        "a LoRA that has only some blocks takes the values of those blocks"


def test_diffusers_transformer_dict_is_a_substring_match_and_ours_is_by_block():
    """Why the transformer dict is ours: diffusers' set_adapters, given a dict on a transformer,
    scales every module whose name contains a key (block 1 takes blocks 10-18 and single blocks
    along) and raises IndexError on a short module path no key names."""
    import diffusers
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from loraloom.bases.presets import preset_configs

    def adapted(targets):
        model = diffusers.FluxTransformer2DModel(**preset_configs("tiny-flux")["transformer"])
        model.add_adapter(LoraConfig(r=1, lora_alpha=1, target_modules=targets), adapter_name="x")
        return model

    model = adapted(["to_q"])
    model.set_adapters(["x"], [{"transformer_blocks.1": 0.5}])
    theirs = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and m.scaling["x"] == 0.5}
    assert {"transformer_blocks.10.attn.to_q", "single_transformer_blocks.1.attn.to_q"} <= theirs, sorted(theirs)
    ours = block_scales({"transformer": {"transformer_blocks": {"block_1": 0.5}}}, "flux",
                        {"transformer": [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]})
    assert {p for p, v in ours["transformer"].items() if v == 0.5} == {"transformer_blocks.1.attn.to_q"}
    with pytest.raises(IndexError):
        adapted(["proj_mlp"]).set_adapters(["x"], [{"transformer_blocks.1": 0.5}])
