"""WeightedBlend: what diffusers' set_adapters(names, adapter_weights) means, on every layer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..graph_runtime import Link, Output, node
from .common import CATEGORY, LORA, MODEL, block_weights_input, model_pool, same_base, weight_input

EXTRA = (2, 3, 4)


@node(id="LoraLoomWeightedBlend", aliases=("WeightedBlend",), category=f"{CATEGORY}/lora",
      display_name="Loom Weighted Blend (set_adapters)",
      inputs=[Link("model", MODEL), Link("lora", LORA),
              weight_input("weight", "the LoRA's weight on the UNet or transformer (negative works)"),
              weight_input("text_encoder_weight", "the LoRA's weight on the text encoder(s)"),
              block_weights_input(),
              *[x for i in EXTRA for x in (Link(f"lora_{i}", LORA, optional=True),
                                           weight_input(f"weight_{i}", f"weight of lora_{i} (UNet and text encoders)",
                                                   optional=True))]],
      outputs=[Output(MODEL, "model")])
class WeightedBlend:
    """Apply LoRAs with weights, unfused: chain the node ComfyUI-style, or give it up to four LoRAs.
    Each LoRA is checked against the base (every key and shape) before anything touches the model.
    Block weights scale the first LoRA per block; their BASE value covers everything outside the
    numbered blocks: the text encoders, and the embedders and final layer of the UNet or
    transformer (Flux, SD3.5: x/context/time-text embedders, norm_out and proj_out)."""

    output_facts = classmethod(same_base)

    def execute(self, model, lora, weight, text_encoder_weight, block_weights, lora_2=None, weight_2=1.0,
                lora_3=None, weight_3=1.0, lora_4=None, weight_4=1.0):
        from ..lora.blocks import BlockWeightError, block_scales
        from ..lora.match import check_lora
        from ..bases.pool import Application

        spec = model_pool().spec(model.base)
        apps = []
        entries = [(lora, weight, text_encoder_weight, block_weights), (lora_2, weight_2, weight_2, ""),
                   (lora_3, weight_3, weight_3, ""), (lora_4, weight_4, weight_4, "")]
        for value, w, te_w, blocks in entries:
            if value is None:
                continue
            check_lora(value, spec)
            try:
                scales = block_scales(blocks, model.base.arch, value.components) if blocks.strip() else {}
            except BlockWeightError as exc:
                raise exc.at(input="block_weights") from None
            name = Path(value.path).stem if value.path else value.fingerprint[:12]
            apps.append(Application(value, name, w, te_w, scales))
        recipe = dataclasses.replace(model, adapters=model.adapters + tuple(apps))
        return {"ui": {"text": [recipe.describe()]}, "result": (recipe,)}
