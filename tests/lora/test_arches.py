"""The one description of each architecture agrees with the models diffusers builds from it."""

import pytest

from loraloom.bases import presets
from loraloom.bases.ldm_keys import original_unet_key
from loraloom.lora.arches import ARCHES
from loraloom.lora.blocks import block_of
from loraloom.lora.keymap import LAYOUTS, UNetLayout


@pytest.mark.parametrize("name", presets.preset_names("unet"))
def test_presets_are_built_from_the_description(name, tiny_pipeline):
    pipe = tiny_pipeline(name)
    arch = ARCHES[presets.get_preset(name).arch]
    assert type(pipe).__name__ == arch.pipeline_class
    assert UNetLayout.from_config(pipe.unet.config) == LAYOUTS[arch.name], "keymap's layout is the description's"
    down = tuple(hasattr(b, "attentions") for b in pipe.unet.down_blocks)
    up = tuple(hasattr(b, "attentions") for b in pipe.unet.up_blocks)
    assert (down, up) == (arch.down_attention, arch.up_attention), f"{name}: cross-attention per block"
    assert all(len(b.resnets) == arch.layers_per_block for b in pipe.unet.down_blocks)
    assert all(getattr(pipe, te, None) is not None for te in arch.text_encoders)
    assert (pipe.unet.config.addition_embed_type == "text_time") == arch.add_embedding


@pytest.mark.parametrize("name", presets.preset_names("unet"))
def test_block_units_and_single_file_numbering_agree(name, tiny_pipeline):
    """Block weights (A1111's IN/OUT numbers) and the single-file export number the UNet alike."""
    unet = tiny_pipeline(name).unet
    arch = presets.get_preset(name).arch
    checked = 0
    for module_name, _ in unet.named_modules():
        parts = module_name.split(".")
        if len(parts) == 4 and parts[0] in ("down_blocks", "up_blocks") and parts[2] in ("resnets", "attentions"):
            slot = int(original_unet_key(module_name, unet.config).split(".")[1])
            unit = f"{'IN' if parts[0] == 'down_blocks' else 'OUT'}{slot:02d}"
            assert block_of("unet", module_name + (".conv1" if parts[2] == "resnets" else ".proj_in"), arch) == unit, f"{name}: {module_name} is not in {unit}"
            checked += 1
    assert checked >= 20, f"{name}: only {checked} block layers found"
