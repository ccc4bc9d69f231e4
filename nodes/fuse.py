"""Fuse and Compile: recipe steps that change how the model runs, not what the LoRAs are."""

from __future__ import annotations

import dataclasses

from ..graph_runtime import Boolean, Combo, InputError, Link, Output, String, node
from .common import CATEGORY, MODEL, same_base, weight_input


@node(id="LoraLoomFuse", aliases=("Fuse",), category=f"{CATEGORY}/model", display_name="Loom Fuse LoRAs",
      inputs=[Link("model", MODEL),
              weight_input("lora_scale",
                           tooltip="multiplies the LoRAs being fused (only those: unlike diffusers, the others keep "
                                   "their scale)"),
              String("adapter_names", "", tooltip="comma-separated LoRA names to fuse; empty: all active LoRAs")],
      outputs=[Output(MODEL, "model")])
class Fuse:
    """What fuse_lora(adapter_names, lora_scale) means: bake LoRAs into the weights. Sampling then runs
    at the plain base's speed, sample-time lora_scale no longer touches them, and the base is restored
    bit-for-bit whenever a later recipe needs it."""

    output_facts = classmethod(same_base)

    def execute(self, model, lora_scale, adapter_names):
        wanted = [n.strip() for n in adapter_names.split(",") if n.strip()]
        names = [a.name for a in model.adapters]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise InputError(f"adapter_names {missing} not among the active LoRAs {names}.", input="adapter_names",
                             value=missing, limit=names, kind="unknown_adapter",
                             fix="use names from that list, or leave it empty to fuse all")
        chosen = [a for a in model.adapters if not wanted or a.name in wanted]
        fused = tuple(dataclasses.replace(a, weight=a.weight * lora_scale,
                                          text_encoder_weight=a.text_encoder_weight * lora_scale) for a in chosen)
        rest = tuple(a for a in model.adapters if not any(a is c for c in chosen))
        recipe = dataclasses.replace(model, fused=model.fused + fused, adapters=rest)
        return {"ui": {"text": [recipe.describe()]}, "result": (recipe,)}


@node(id="LoraLoomCompile", aliases=("Compile",), category=f"{CATEGORY}/model",
      display_name="Loom Compile (torch.compile)",
      inputs=[Link("model", MODEL),
              Combo("mode", ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"], "default"),
              Boolean("fullgraph", False), Boolean("dynamic", False),
              Boolean("channels_last", False, tooltip="NHWC memory layout (faster convolutions on GPUs)")],
      outputs=[Output(MODEL, "model")])
class Compile:
    """torch.compile the denoiser (the UNet of SD1.5 / SDXL, the transformer of Flux / SD3.5) once
    per base and options. Later weight changes, LoRA swaps and re-fusing write the weights in place
    and do not recompile."""

    output_facts = classmethod(same_base)

    def execute(self, model, mode, fullgraph, dynamic, channels_last):
        from ..bases.pool import CompileOptions

        return (dataclasses.replace(model, compile=CompileOptions(mode, fullgraph, dynamic, channels_last)),)
