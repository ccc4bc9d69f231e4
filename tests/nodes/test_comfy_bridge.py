"""The bridge node's own logic outside ComfyUI: the names it gives our modules in ComfyUI's key maps,
where each module lands, and the errors. Inside ComfyUI: tests/comfyui/test_bridge.py."""

import subprocess
import sys

import pytest
import torch

from loraloom.lora.canonical import LoRA, LoRAModule
from loraloom.lora.errors import LoRAMatchError
from loraloom.lora.writers import to_kohya_state_dict
from loraloom.nodes.comfy_bridge import (NODE_ID, ApplyLoRA, _scales, comfy_key_name, fits, plan_patches,
                                         target_shape, unmatched_error)


def test_module_names_are_the_ones_comfyui_key_maps_list():
    # ComfyUI: "lora_unet_" + diffusers key with "_" (comfy.utils.unet_to_diffusers), "transformer." +
    # diffusers key (flux_to_diffusers / mmdit_to_diffusers), lora_te1_ for CLIP-L, lora_te2_ / lora_te3_
    # for the second / third encoder (model_lora_keys_clip)
    assert comfy_key_name("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0") \
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert comfy_key_name("transformer", "single_transformer_blocks.3.proj_mlp") \
        == "transformer.single_transformer_blocks.3.proj_mlp"
    assert comfy_key_name("text_encoder", "encoder.layers.11.mlp.fc2") == "lora_te1_text_model_encoder_layers_11_mlp_fc2"
    assert comfy_key_name("text_encoder_2", "encoder.layers.3.self_attn.q_proj") \
        == "lora_te2_text_model_encoder_layers_3_self_attn_q_proj"
    assert comfy_key_name("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q") \
        == "lora_te2_encoder_block_0_layer_0_SelfAttention_q"


def test_unet_names_are_those_of_the_kohya_files_we_write_for_comfyui():
    lora = LoRA({"unet": {"mid_block.attentions.0.proj_in": LoRAModule(torch.ones(2, 8), torch.ones(8, 2), 2.0)},
                 "text_encoder": {"encoder.layers.0.mlp.fc1": LoRAModule(torch.ones(2, 8), torch.ones(8, 2), 2.0)}},
                "derived")
    written = {k.rsplit(".", 2)[0] for k in to_kohya_state_dict(lora, arch="sd15", unet_names="diffusers")
               if k.endswith(".lora_down.weight")}
    names = {comfy_key_name(c, p) for c, p, _ in lora.modules()}
    assert names == {n.replace("lora_te_", "lora_te1_") for n in written}, (names, written)


def test_offsets_narrow_the_target_and_kernel_layouts_fit():
    assert target_shape((9216, 3072), ("w", (0, 3072, 3072))) == (3072, 3072)
    assert target_shape((320, 320, 1, 1), "w") == (320, 320, 1, 1)
    assert fits((320, 320), (320, 320, 1, 1)), "a linear LoRA on a 1x1 conv: ComfyUI reshapes"
    assert fits((64, 32 * 9), (64, 32, 3, 3)), "a LoHa's flattened conv delta"
    assert not fits((320, 768), (320, 1024)) and not fits((640, 320), (320, 640))


def _flux_like():
    """Module shapes of a LoRA on a fused-qkv model: q, k, v of width 4, one MLP, one text-encoder layer."""
    return [("transformer", "transformer_blocks.0.attn.to_q", (4, 4)), ("transformer", "transformer_blocks.0.attn.to_k", (4, 4)),
            ("transformer", "transformer_blocks.0.attn.to_v", (4, 4)), ("transformer", "proj_out", (8, 4)),
            ("text_encoder", "encoder.layers.0.mlp.fc1", (16, 4))]


KEY_MAP = {"transformer.transformer_blocks.0.attn.to_q": ("dm.qkv.weight", (0, 0, 4)),
           "transformer.transformer_blocks.0.attn.to_k": ("dm.qkv.weight", (0, 4, 4)),
           "transformer.transformer_blocks.0.attn.to_v": ("dm.qkv.weight", (0, 8, 4)),
           "transformer.proj_out": "dm.final.weight",
           "lora_te1_text_model_encoder_layers_0_mlp_fc1": "clip_l.fc1.weight"}
SHAPES = {"dm.qkv.weight": (12, 4), "dm.final.weight": (8, 4), "clip_l.fc1.weight": (16, 4)}


def test_every_module_lands_on_its_weight_grouped_by_strength_times_block_weight():
    scales = {"transformer": {"transformer_blocks.0.attn.to_k": 0.5, "proj_out": 0.0}}
    plan = plan_patches(_flux_like(), KEY_MAP, SHAPES, scales, 0.8, 0.6, with_clip=True)
    assert not plan.unmatched
    assert plan.groups == {
        ("model", 0.8): {"transformer.transformer_blocks.0.attn.to_q": ("dm.qkv.weight", (0, 0, 4)),
                         "transformer.transformer_blocks.0.attn.to_v": ("dm.qkv.weight", (0, 8, 4))},
        ("model", 0.4): {"transformer.transformer_blocks.0.attn.to_k": ("dm.qkv.weight", (0, 4, 4))},
        ("clip", 0.6): {"lora_te1_text_model_encoder_layers_0_mlp_fc1": "clip_l.fc1.weight"}}
    assert plan.applied == {"transformer": 3, "text_encoder": 1} and plan.zero == {"transformer": 1}


def test_without_a_clip_text_encoder_modules_are_left_out_and_strength_zero_patches_nothing():
    plan = plan_patches(_flux_like(), KEY_MAP, SHAPES, {}, 0.0, 1.0, with_clip=False)
    assert not plan.groups and not plan.unmatched and plan.zero == {"transformer": 4}


def test_a_module_with_no_weight_or_the_wrong_shape_is_unmatched():
    modules = _flux_like() + [("transformer", "single_transformer_blocks.0.proj_mlp", (16, 4)),
                              ("text_encoder", "encoder.layers.0.mlp.fc1", (16, 8))]
    plan = plan_patches(modules, KEY_MAP, SHAPES, {}, 1.0, 1.0, with_clip=True)
    assert [(c, p) for c, p, _, _ in plan.unmatched] == [
        ("transformer", "single_transformer_blocks.0.proj_mlp"), ("text_encoder", "encoder.layers.0.mlp.fc1")]
    assert plan.unmatched[0][3] == "no weight of this model has that name"
    assert plan.unmatched[1][3] == "shape [16, 8], weight clip_l.fc1.weight is [16, 4]"


def test_the_unmatched_error_names_node_modules_count_model_and_fix():
    modules = [("unet", f"down_blocks.1.attentions.0.proj_in.{i}", (4, 4)) for i in range(7)]
    plan = plan_patches(modules, {}, {}, {}, 1.0, 1.0, with_clip=True)
    exc = unmatched_error(plan, 9, "SD15", "sdxl")
    text = str(exc)
    assert isinstance(exc, LoRAMatchError) and exc.kind == "unmatched_keys" and exc.value == 7
    assert text.startswith(f"node {NODE_ID}: 7 of 9 LoRA modules fit no weight of this SD15 model"), text
    assert "lora_unet_down_blocks_1_attentions_0_proj_in_4" in text and "_proj_in_5" not in text, "first five only"
    assert "and 2 more" in text and "The LoRA looks like sdxl." in text and "Fix: use a LoRA made for" in text, text
    assert exc.key == "lora_unet_down_blocks_1_attentions_0_proj_in_0"


def test_block_weights_are_read_as_weightedblend_reads_them_and_need_a_known_layout():
    lora = LoRA({"unet": {"up_blocks.1.attentions.0.proj_in": LoRAModule(torch.ones(2, 8), torch.ones(8, 2), 2.0),
                          "down_blocks.0.attentions.0.proj_in": LoRAModule(torch.ones(2, 8), torch.ones(8, 2), 2.0)}},
                "derived")
    scales = _scales("OUTALL", "sd15", "SD15", lora)
    assert scales["unet"]["up_blocks.1.attentions.0.proj_in"] == 1.0
    assert scales["unet"]["down_blocks.0.attentions.0.proj_in"] == 0.0
    assert _scales("  ", None, "SSD1B", lora) == {}
    with pytest.raises(Exception) as refused:
        _scales("OUTALL", None, "SSD1B", lora)
    assert "input 'block_weights'" in str(refused.value) and "this is a SSD1B model" in str(refused.value)
    with pytest.raises(Exception) as bad:
        _scales("1,2,3", "sd15", "SD15", lora)
    assert "input 'block_weights'" in str(bad.value)


def test_the_bridge_is_comfy_only_and_its_module_imports_no_torch():
    import loraloom
    from loraloom.nodes import comfy_only_mappings, registry

    assert ApplyLoRA.SCHEMA.comfy_only and ApplyLoRA.RETURN_TYPES == ("MODEL", "CLIP")
    assert NODE_ID not in loraloom.NODE_CLASS_MAPPINGS and NODE_ID not in registry(), "headless: not listed"
    assert comfy_only_mappings()[0] == {NODE_ID: ApplyLoRA}
    code = "import sys, loraloom.nodes.comfy_bridge; print('torch' in sys.modules, 'comfy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], out


def test_module_tensors_are_what_comfyuis_loader_reads_and_a_lokr_part_goes_as_its_delta():
    from loraloom.lora.canonical import LoKrModule, delta
    from loraloom.nodes.comfy_bridge import _state_dict

    pair = LoRAModule(torch.arange(8.0).reshape(2, 4), torch.ones(4, 2), 3.0)
    whole = LoKrModule(alpha=1.0, w1=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), w2=torch.ones(2, 2))
    part = LoKrModule(alpha=1.0, w1=whole.w1, w2=whole.w2, rows=((1, 3),))
    lora = LoRA({"transformer": {"proj_out": pair, "single_transformer_blocks.0.attn.to_q": part,
                                 "single_transformer_blocks.0.proj_mlp": whole}}, "derived")
    names = {comfy_key_name(c, p) for c, p, _ in lora.modules()} - {"transformer.single_transformer_blocks.0.proj_mlp"}
    out = _state_dict(lora, names)
    assert set(out) == {"transformer.proj_out.lora_down.weight", "transformer.proj_out.lora_up.weight",
                        "transformer.proj_out.alpha", "transformer.single_transformer_blocks.0.attn.to_q.diff"}
    assert out["transformer.proj_out.lora_down.weight"] is pair.down and out["transformer.proj_out.alpha"].item() == 3.0
    rows = out["transformer.single_transformer_blocks.0.attn.to_q.diff"]
    assert torch.equal(rows, delta(whole)[1:3]) and rows.shape == (2, 4), rows
