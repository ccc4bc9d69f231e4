"""Put a canonical `LoRA` into a live diffusers pipeline as a named peft adapter, with exact alpha.

This is how a LoRA read by LoRA Loom (any format `lora.readers` reads: kohya, LyCORIS, diffusers,
peft) goes into a diffusers pipeline of your own; the tests and benchmarks use it to compare our
maths with diffusers' own. `apply_lora` checks the LoRA against the pipeline first
(`lora.match.check_lora`: names and shapes, before anything is touched), then hands diffusers the
same thing a diffusers file with its own adapter metadata would give it: a peft-named state dict plus
per-component LoraConfig fields (r, lora_alpha, rank_pattern, alpha_pattern) through the pipeline's
own ``load_lora_into_unet`` / ``load_lora_into_text_encoder``. So alpha is never lost (diffusers'
in-memory path, a state dict without metadata, assumes alpha = rank) and ``set_adapters`` /
``fuse_lora`` / ``delete_adapters`` work on the result as on any adapter. LoHa and LoKr modules are
converted first (`lora.convert.as_lora`): peft's LoRA layers cannot hold them.

Nothing here builds a pipeline; it only uses the one it is given.
"""
from __future__ import annotations

from typing import Any

import torch

from ..lora.canonical import LoRA, LoRAModule, Module
from ..lora.convert import as_lora
from ..lora.errors import LoRAError
from ..lora.match import BaseSpec, MatchReport, base_spec, check_lora
from ..lora.writers import adapter_config, require_lora_module


def _fit_to(module: LoRAModule, kind: str) -> LoRAModule:
    # A 2-D LoRA on a 1x1 conv (or the reverse) is the same maths; peft needs the layer's form.
    if kind == "conv2d" and module.down.ndim == 2:
        return LoRAModule(module.down[:, :, None, None], module.up[:, :, None, None], module.alpha, module.key)
    if kind == "linear" and module.down.ndim == 4:
        return LoRAModule(module.down.flatten(1), module.up.flatten(1), module.alpha, module.key)
    return module


def peft_inputs(lora: LoRA, base: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, flat adapter metadata) with component prefixes and the live models' module
    names, for diffusers' ``load_lora_into_*`` loaders: what ``lora_state_dict`` returns for a
    diffusers file with metadata. Only modules the base has are included; LoHa/LoKr must have been
    converted (`as_lora`)."""
    spec: BaseSpec = base_spec(base)
    tensors: dict[str, torch.Tensor] = {}
    fitted: dict[str, dict[str, Module]] = {}
    for component, path, module in lora.modules():
        target = spec.components.get(component, {}).get(path)
        if target is None:
            continue
        module = require_lora_module(component, path, module, "peft adapters need LoRA modules", "(apply_lora does this).")
        module = _fit_to(module, target.kind)
        name = spec.model_name(component, path)
        tensors[f"{component}.{name}.lora_A.weight"] = module.down
        tensors[f"{component}.{name}.lora_B.weight"] = module.up
        fitted.setdefault(component, {})[path] = module
    fitted_lora = lora.replace(components=fitted) if fitted else None
    metadata: dict[str, Any] = {}
    for component in fitted:
        for key, value in adapter_config(fitted_lora, component).items():
            metadata[f"{component}.{key}"] = value
    return tensors, metadata


def apply_lora(
    pipe: Any,
    lora: LoRA,
    adapter_name: str,
    *,
    min_fraction: float = 1.0,
    lycoris_rank: int | None = None,
) -> MatchReport:
    """Load `lora` into `pipe` (a diffusers SD1.5/SDXL pipeline) as adapter `adapter_name`.

    The LoRA is checked against the pipeline before anything is touched (`check_lora` with
    `min_fraction`); LoHa/LoKr modules are converted by `as_lora` (exact unless `lycoris_rank`).
    Like ``load_lora_weights``, the new adapter becomes the only active one. Returns the match
    report. If diffusers fails half-way, the adapter is deleted again before the error propagates.
    """
    spec = base_spec(pipe)
    report = check_lora(lora, spec, min_fraction=min_fraction)
    existing = _adapter_names(pipe)
    if adapter_name in existing:
        raise LoRAError(f"adapter name {adapter_name!r} is already loaded; present adapters: {sorted(existing)}.",
                        key=adapter_name, value=adapter_name, kind="adapter_exists",
                        fix="pick another name or delete_adapters() it first.")
    lora = as_lora(lora, rank=lycoris_rank, base=spec)
    tensors, metadata = peft_inputs(lora, spec)
    cls = type(pipe)
    try:
        if any(k.startswith("unet.") for k in tensors):
            cls.load_lora_into_unet(
                tensors, network_alphas=None, unet=pipe.unet, adapter_name=adapter_name,
                metadata=metadata, _pipeline=pipe, low_cpu_mem_usage=_low_cpu_mem_usage(),
            )  # fmt: skip
        for component in ("text_encoder", "text_encoder_2"):
            if any(k.startswith(component + ".") for k in tensors):
                cls.load_lora_into_text_encoder(
                    tensors, network_alphas=None, text_encoder=getattr(pipe, component), prefix=component,
                    lora_scale=getattr(pipe, "lora_scale", 1.0), adapter_name=adapter_name,
                    _pipeline=pipe, metadata=metadata, low_cpu_mem_usage=_low_cpu_mem_usage(),
                )  # fmt: skip
    except Exception:
        if adapter_name in _adapter_names(pipe):
            pipe.delete_adapters(adapter_name)
        raise
    return report


def _low_cpu_mem_usage() -> bool:
    # load_lora_weights' own default: the same code path gives bit-identical adapters
    from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA

    return _LOW_CPU_MEM_USAGE_DEFAULT_LORA


def _adapter_names(pipe: Any) -> set[str]:
    try:
        listed = pipe.get_list_adapters()
    except (AttributeError, ValueError):
        return set()
    return {name for names in listed.values() for name in names}
