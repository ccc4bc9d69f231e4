"""lora/keymap.py: kohya and SGM module names to canonical diffusers paths, and the diffusers
converter bugs the mapping works around."""
from __future__ import annotations

import pytest
import torch

from loraloom.fixtures import UNET_PRESETS as PRESETS  # the UNet fixture LoRAs' bases (DiTs: dit_files)
from loraloom.lora import keymap
from loraloom.lora.keymap import UNetLayout, kohya_module_name, kohya_names_to_paths



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
