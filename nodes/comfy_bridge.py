"""ApplyLoRA (id LoraLoomApplyLoRA): one of our LoRA values on ComfyUI's own MODEL and CLIP, inside
ComfyUI only.

It hands the LoRA to ComfyUI's own LoRA patching, as ComfyUI's LoraLoader does with a file's state
dict (`comfy.sd.load_lora_for_models`): ComfyUI's key maps (`comfy.lora.model_lora_keys_unet` /
`model_lora_keys_clip`) name the model weight of every LoRA module, `comfy.lora.load_lora` turns
the module's tensors into ComfyUI's patch objects, and `add_patches` on clones of the inputs adds
them (lazily: ComfyUI computes the patched weights when it loads the model to sample). So sampling
with ComfyUI's KSampler gives exactly what LoraLoader gives for the same LoRA saved to a file, on any
base ComfyUI loads whose layers the LoRA targets; Flux's separate q / k / v modules land in its
fused qkv weights at the offsets ComfyUI's key map gives.

What it adds to LoraLoader: block weights (the notations WeightedBlend reads, scaling each module
as our model pool does: strength x block weight), and no silent partial load. ComfyUI only logs
"lora key not loaded" for a key its maps do not know; here every module must name a weight of the
right size, or the node fails with the modules that do not, before anything is patched.

Each module's ComfyUI name is the one ComfyUI's maps list for it: kohya's ``lora_unet_<diffusers
path>`` for a UNet, diffusers' ``transformer.<path>`` for a Flux / SD3.5 transformer (whose maps carry
the fused-weight offsets), and kohya's ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_`` names for the
text encoders (``lora_te1_`` is CLIP-L wherever ComfyUI has one, so it also serves SD1.5's encoder).

This module imports neither torch nor ComfyUI until the node runs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..graph_runtime import Link, Output, node
from ..lora.arches import DENOISERS
from .common import CATEGORY, LORA, block_weights_input, lora_source_name, weight_input

NODE_ID = "LoraLoomApplyLoRA"
COMFY_MODEL, COMFY_CLIP = "MODEL", "CLIP"
COMFY_ARCHES = {"SD15": "sd15", "SDXL": "sdxl", "Flux": "flux", "FluxSchnell": "flux", "SD3": "sd3"}
"""ComfyUI's model classes (`comfy.supported_models`) whose block layout is one of ours, by exact
class: a subclass may change the layout (SSD-1B drops SDXL blocks), so it gets no block weights."""
SHOW_UNMATCHED = 5


@dataclass
class Plan:
    """What the LoRA's modules do on a model: the patch groups by strength (strength x block weight,
    one ``add_patches`` call each), and the modules that fit nothing."""

    groups: dict[tuple[str, float], dict[str, Any]] = field(default_factory=dict)
    """(``"model"`` | ``"clip"``, strength) -> {ComfyUI LoRA key name: ComfyUI target}."""
    applied: Counter = field(default_factory=Counter)
    """component -> modules patched."""
    zero: Counter = field(default_factory=Counter)
    """component -> modules left out at strength 0."""
    unmatched: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(component, module path, ComfyUI LoRA key name, why) for each module that fits no weight."""


def comfy_key_name(component: str, path: str) -> str:
    """The name ComfyUI's LoRA key maps give canonical module ``path`` of ``component``."""
    from ..lora.keymap import kohya_module_name

    if component == "transformer":
        return f"transformer.{path}"
    return kohya_module_name(component, path, te_prefix="lora_te1_")


def target_shape(shape: tuple[int, ...], target: Any) -> tuple[int, ...]:
    """The shape a patch on ``target`` changes: the weight's, narrowed where ComfyUI's key map gives an
    offset (``(key, (dim, start, length))``, e.g. Flux's q inside the fused qkv)."""
    if isinstance(target, tuple) and len(target) > 1 and target[1] is not None:
        dim, _, length = target[1]
        shape = (*shape[:dim], length, *shape[dim + 1:])
    return tuple(shape)


def fits(module_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether a module of ``module_shape`` can patch a weight of ``shape``: the same shape, or the
    same outputs and inputs under another kernel layout (a 1x1 conv for a linear layer, a LoHa's
    flattened conv delta), which ComfyUI reshapes."""
    if tuple(module_shape) == tuple(shape):
        return True
    return bool(module_shape) and module_shape[0] == shape[0] and math.prod(module_shape[1:]) == math.prod(shape[1:])


def plan_patches(modules, key_map: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                 scales: Mapping[str, Mapping[str, float]], strength_model: float, strength_clip: float,
                 with_clip: bool) -> Plan:
    """Place every module of ``modules`` (``(component, path, module shape)``): its ComfyUI name in
    ``key_map`` (name -> weight key, or ``(key, offset)``), the weight's shape in ``shapes``, its
    strength ``strength x scales[component][path]``. Text-encoder modules are left out without a CLIP."""
    plan = Plan()
    for component, path, shape in modules:
        denoiser = component in DENOISERS
        if not denoiser and not with_clip:
            continue
        name = comfy_key_name(component, path)
        target = key_map.get(name)
        key = target[0] if isinstance(target, tuple) else target
        if target is None or key not in shapes:
            plan.unmatched.append((component, path, name, "no weight of this model has that name"))
            continue
        want = target_shape(shapes[key], target)
        if not fits(shape, want):
            plan.unmatched.append((component, path, name, f"shape {list(shape)}, weight {key} is {list(want)}"))
            continue
        strength = (strength_model if denoiser else strength_clip) * scales.get(component, {}).get(path, 1.0)
        if strength == 0.0:
            plan.zero[component] += 1
            continue
        plan.groups.setdefault(("model" if denoiser else "clip", strength), {})[name] = target
        plan.applied[component] += 1
    return plan


def unmatched_error(plan: Plan, total: int, model_name: str, lora_arch: str | None):
    """The error for a LoRA with modules that fit no weight of the model: the first few, the count,
    the model, what the LoRA looks like, and a Fix."""
    from ..lora.errors import LoRAMatchError

    shown = "; ".join(f"{c} {p} ({n}): {why}" for c, p, n, why in plan.unmatched[:SHOW_UNMATCHED])
    more = len(plan.unmatched) - SHOW_UNMATCHED
    looks = f" The LoRA looks like {lora_arch}." if lora_arch else ""
    return LoRAMatchError(
        f"node {NODE_ID}: {len(plan.unmatched)} of {total} LoRA modules fit no weight of this {model_name} model "
        f"(ComfyUI would skip them, logging 'lora key not loaded'): {shown}" + (f"; and {more} more" if more > 0 else "")
        + f".{looks}",
        key=plan.unmatched[0][2], value=len(plan.unmatched), limit=0, kind="unmatched_keys", class_type=NODE_ID,
        fix="use a LoRA made for this model's architecture, or load a checkpoint of the LoRA's architecture "
            "(CheckpointLoaderSimple)")


def _scales(block_weights: str, arch: str | None, model_name: str, lora) -> dict:
    from ..lora.blocks import BlockWeightError, block_scales

    if not block_weights.strip():
        return {}
    if arch is None:
        raise BlockWeightError(
            f"block weights need a model whose block layout is known (SD1.5, SDXL, Flux, SD3.5); this is a "
            f"{model_name} model.", value=model_name, limit=sorted(set(COMFY_ARCHES.values())),
            fix="clear block_weights").at(input="block_weights", class_type=NODE_ID)
    try:
        return block_scales(block_weights, arch, lora.components)
    except BlockWeightError as exc:
        raise exc.at(input="block_weights", class_type=NODE_ID) from None


def _state_dict(lora, names: set[str]) -> dict:
    """The tensors of the modules named in ``names``, as ComfyUI's loader reads a kohya file: a part
    of a LoKr on a fused weight (some rows of a product, which no file module holds) as its full
    delta (ComfyUI's ``.diff`` patch)."""
    from ..lora.canonical import delta
    from ..lora.writers import put_module

    out = {}
    for component, path, module in lora.modules():
        name = comfy_key_name(component, path)
        if name not in names:
            continue
        if getattr(module, "rows", None) is not None:
            out[f"{name}.diff"] = delta(module)
        else:
            put_module(out, name, module)
    return out


def _weight_shapes(torch_module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in torch_module.state_dict().items()}


@node(id=NODE_ID, category=f"{CATEGORY}/comfyui", display_name="Loom Apply LoRA (MODEL, CLIP)", comfy_only=True,
      inputs=[Link("model", COMFY_MODEL, tooltip="ComfyUI's model (e.g. from Load Checkpoint)"),
              Link("lora", LORA, tooltip="our LoRA value: from Loom Load LoRA, or a merge"),
              weight_input("strength_model", "the LoRA's strength on the model (UNet or transformer)"),
              weight_input("strength_clip", "the LoRA's strength on the text encoder(s)"),
              block_weights_input(),
              Link("clip", COMFY_CLIP, optional=True, tooltip="ComfyUI's CLIP; without it the LoRA's text-encoder "
                   "modules are left out")],
      outputs=[Output(COMFY_MODEL, "model"), Output(COMFY_CLIP, "clip")])
class ApplyLoRA:
    """Apply one of our LoRA values (loaded, or merged with any method) to ComfyUI's MODEL and CLIP
    through ComfyUI's own LoRA patching, with block weights; the inputs stay unchanged (clones are
    patched). Every LoRA module must fit a weight of the model, or nothing is applied and the error
    names the modules that do not."""

    def execute(self, model, lora, strength_model, strength_clip, block_weights, clip=None):
        import comfy.lora

        from ..lora.match import guess_architecture

        config = model.model.model_config
        model_name = type(config).__name__
        arch = COMFY_ARCHES.get(model_name)
        scales = _scales(block_weights, arch, model_name, lora)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        shapes = _weight_shapes(model.model)
        if clip is not None:
            key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
            shapes.update(_weight_shapes(clip.cond_stage_model))
        modules = [(c, p, tuple(m.shape)) for c, p, m in lora.modules()]
        plan = plan_patches(modules, key_map, shapes, scales, strength_model, strength_clip, clip is not None)
        if plan.unmatched:
            raise unmatched_error(plan, len(modules), model_name, guess_architecture(lora)[0])

        patched = {"model": model.clone(), "clip": clip.clone() if clip is not None else None}
        tensors = _state_dict(lora, {name for names in plan.groups.values() for name in names})
        for (part, strength), to_load in plan.groups.items():
            loaded = comfy.lora.load_lora(tensors, to_load, log_missing=False)
            added = set(patched[part].add_patches(loaded, strength))
            lost = [name for name, target in to_load.items() if target not in added]
            if lost:  # a module ComfyUI's adapters did not take: never a silent partial load
                raise _not_taken(lost, model_name)
        report = _report(lora, model_name, plan, strength_model, strength_clip, scales, block_weights, clip is None)
        return {"ui": {"text": [report]}, "result": (patched["model"], patched["clip"])}


def _not_taken(lost: list[str], model_name: str):
    from ..lora.errors import LoRAMatchError

    return LoRAMatchError(
        f"node {NODE_ID}: ComfyUI's LoRA loader took no patch from {len(lost)} module(s) on this {model_name} "
        f"model: {', '.join(lost[:SHOW_UNMATCHED])}", key=lost[0], value=len(lost), limit=0, kind="not_loaded",
        class_type=NODE_ID, fix="convert the LoRA to plain LoRA pairs first (loraloom.lora.convert.as_lora)")


def _report(lora, model_name: str, plan: Plan, strength_model: float, strength_clip: float, scales: dict,
            block_weights: str, no_clip: bool) -> str:
    """What was applied: the LoRA, per component the modules patched, the strengths and block scales."""
    name = lora_source_name(lora) or lora.fingerprint[:12]
    lines = [f"{name} on ComfyUI {model_name}: MODEL x{strength_model:g}, CLIP x{strength_clip:g}"]
    for component, n in plan.applied.items():
        lines.append(f"{component}: {n} modules patched")
    for component, n in plan.zero.items():
        lines.append(f"{component}: {n} modules at strength 0 (left out)")
    if no_clip:
        for component, modules in lora.components.items():
            if component not in DENOISERS:
                lines.append(f"{component}: {len(modules)} modules not applied (no CLIP connected)")
    if block_weights.strip():
        from ..lora.blocks import parse_block_weights

        lines.append("block weights: " + parse_block_weights(block_weights, COMFY_ARCHES[model_name]).describe())
        used = Counter(s for per in scales.values() for s in per.values())
        lines.append("module scales: " + ", ".join(f"x{s:g} {n}" for s, n in sorted(used.items())))
    return "\n".join(lines)
