"""lora/match.py: checking a LoRA against a base's modules and shapes, and naming the architecture
it was made for when it does not fit."""
from __future__ import annotations

import pytest
import torch

from loraloom.lora.errors import LoRAMatchError
from loraloom.lora.match import check_lora, match_lora
from loraloom.lora.readers import lora_from_state_dict, read_lora


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


def test_flux_lora_on_sdxl_base_names_flux(dit_files, specs):
    lora = read_lora(dit_files["tiny-flux/kohya"])
    with pytest.raises(LoRAMatchError) as info:
        check_lora(lora, specs["tiny-sdxl"])
    text = str(info.value)
    # the architecture label comes from lora.arches once Flux is described there
    assert "looks made for" in text and "flux" in text.lower() and "single_transformer_blocks" in text, text
    assert check_lora(lora, specs["tiny-flux"]).base_arch == "flux"
    with pytest.raises(LoRAMatchError, match="do not fit the base's shapes|modules .* match the base"):
        check_lora(read_lora(dit_files["tiny-sd3/kohya"]), specs["tiny-flux"])


def test_base_spec_names_the_architecture_from_its_description(dit_pipelines, tiny_sd15):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from loraloom.lora.match import base_spec

    assert base_spec(dit_pipelines["tiny-flux"]).arch == "flux", "T5 as text_encoder_2 is not SDXL's"
    assert base_spec(dit_pipelines["tiny-sd3"]).arch == "sd3"
    assert base_spec(tiny_sd15).arch == "sd15"
    # module names alone cannot tell these apart (no single-stream blocks, no guidance, few blocks;
    # no SD3 positional embedding): the transformer's class, as the arch description names it, does
    flux_like = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=0, attention_head_dim=8,
                                       num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                       axes_dims_rope=(2, 2, 4))  # fmt: skip
    assert base_spec({"transformer": flux_like}).arch == "flux"
    sd3_like = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)  # fmt: skip
    assert base_spec({"transformer": sd3_like}).arch == "sd3"
    shapes = {"transformer": {p: s.shape for p, s in base_spec({"transformer": flux_like}).components["transformer"].items()}}
    assert base_spec(shapes).arch is None, "names and shapes alone: no guess from a class"
