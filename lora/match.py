"""Check a LoRA against a base model before anything touches the model.

`base_spec` reduces a base (a live pipeline, ``{component: nn.Module}``, or plain
``{component: {module_path: weight_shape}}``) to names and shapes; `match_lora` pairs every LoRA
module with a base module and checks shapes; `check_lora` raises `LoRAMatchError` when shapes
disagree or too little matches, naming the first unmatched keys and the architecture the LoRA
looks made for ("this LoRA looks made for SDXL: it has text_encoder_2 keys ...").
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .arches import ARCHES
from .canonical import COMPONENTS, TEXT_ENCODERS, LoRA, LoRAModule, Module
from .errors import LoRAMatchError
from .keymap import TEXT_MODEL, UNetLayout, normalize_te_path, te_model_path

_TRANSFORMER_INDEX = re.compile(r"\.transformer_blocks\.(\d+)\.")


@dataclass(frozen=True)
class ModuleSpec:
    """A base module a LoRA can target: "linear" or "conv2d", and its weight shape."""

    kind: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BaseSpec:
    """Names and weight shapes of a base model's LoRA-targetable modules (canonical paths).

    ``has_text_model[component]`` says whether that text encoder keeps its modules under
    ``text_model.`` (CLIPTextModelWithProjection does, transformers 5's CLIPTextModel does not).
    """

    components: Mapping[str, Mapping[str, ModuleSpec]]
    arch: str | None = None
    has_text_model: Mapping[str, bool] = field(default_factory=dict)
    unet_layout: UNetLayout | None = None

    def model_name(self, component: str, path: str) -> str:
        """The module's name inside the live component (text_model. added back where needed)."""
        if component not in TEXT_ENCODERS:
            return path
        return te_model_path(path, self.has_text_model.get(component, False))


def _module_specs(module: Any, component: str) -> tuple[dict[str, ModuleSpec], bool]:
    import torch

    specs: dict[str, ModuleSpec] = {}
    has_text_model = False
    for name, sub in module.named_modules():
        if ".base_layer" in name or ".lora_" in name or name.endswith(".base_layer"):
            continue
        layer = getattr(sub, "base_layer", sub)  # peft-wrapped layers report their base layer
        if isinstance(layer, torch.nn.Linear):
            kind = "linear"
        elif isinstance(layer, torch.nn.Conv2d):
            kind = "conv2d"
        else:
            continue
        if component in TEXT_ENCODERS:
            has_text_model = has_text_model or name.startswith(TEXT_MODEL)
            name = normalize_te_path(name)
        specs[name] = ModuleSpec(kind, tuple(int(d) for d in layer.weight.shape))
    return specs, has_text_model


def base_spec(base: Any) -> BaseSpec:
    """Reduce `base` to a `BaseSpec`: a diffusers pipeline (``.unet``, ``.text_encoder``,
    ``.text_encoder_2``), a mapping ``{component: nn.Module}``, a mapping
    ``{component: {module_path: weight_shape}}``, or a BaseSpec (returned as is). Works on
    meta-device models: only names and shapes are read."""
    if isinstance(base, BaseSpec):
        return base
    if isinstance(base, Mapping):
        parts = dict(base)
    else:
        parts = {c: getattr(base, c) for c in COMPONENTS if getattr(base, c, None) is not None}
    components: dict[str, dict[str, ModuleSpec]] = {}
    has_text_model: dict[str, bool] = {}
    layout = None
    for component, part in parts.items():
        if part is None:
            continue
        if isinstance(part, Mapping):
            components[component] = {
                normalize_te_path(p) if component in TEXT_ENCODERS else p: ModuleSpec(
                    "conv2d" if len(s) == 4 else "linear", tuple(int(d) for d in s)
                )
                for p, s in part.items()
            }
            has_text_model[component] = any(p.startswith(TEXT_MODEL) for p in part)
        else:
            components[component], has_text_model[component] = _module_specs(part, component)
            if component == "unet" and getattr(part, "config", None) is not None:
                layout = UNetLayout.from_config(part.config)
    return BaseSpec(
        components=MappingProxyType({c: MappingProxyType(m) for c, m in components.items()}),
        arch=_described_arch(base, parts) or _arch_from_names(components),
        has_text_model=MappingProxyType(has_text_model),
        unet_layout=layout,
    )


@dataclass(frozen=True)
class ShapeMismatch:
    """One LoRA module whose shape does not fit the base module of the same name."""

    component: str
    path: str
    key: str
    lora_shape: tuple[int, ...]
    base_shape: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class MatchReport:
    """Which LoRA modules a base has (``matched``), lacks (``unmatched``: component, path, file
    key) or has with another shape (``mismatched``); plus the architectures involved."""

    matched: tuple[tuple[str, str], ...]
    unmatched: tuple[tuple[str, str, str], ...]
    mismatched: tuple[ShapeMismatch, ...]
    lora_arch: str | None
    base_arch: str | None
    hints: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        """Number of LoRA modules checked."""
        return len(self.matched) + len(self.unmatched) + len(self.mismatched)

    @property
    def fraction(self) -> float:
        """Share of LoRA modules that match with the right shape (1.0 for an empty LoRA)."""
        return len(self.matched) / self.total if self.total else 1.0

    def summary(self) -> str:
        """One line for logs and node output."""
        text = f"{len(self.matched)}/{self.total} modules match"
        if self.unmatched:
            text += f", {len(self.unmatched)} unmatched"
        if self.mismatched:
            text += f", {len(self.mismatched)} with wrong shapes"
        return text


def _fits(module: Module, spec: ModuleSpec) -> str | None:
    """None when `module` can change a weight of `spec`, else the reason it cannot."""
    base = spec.shape
    if isinstance(module, LoRAModule):
        out, inp = module.up.shape[0], module.down.shape[1]
        if (out, inp) != (base[0], base[1]):
            return f"LoRA maps {inp} -> {out} features, the base layer {base[1]} -> {base[0]}"
        lora_kernel = module.kernel_size or (1, 1)
        base_kernel = base[2:] or (1, 1)
        if tuple(lora_kernel) != tuple(base_kernel):
            return f"LoRA kernel {tuple(lora_kernel)}, base kernel {tuple(base_kernel)}"
        return None
    shape = module.shape
    if shape[0] != base[0] or math.prod(shape[1:]) != math.prod(base[1:]):
        return f"{module.kind} delta is {tuple(shape)}, the base weight {base}"
    if len(shape) == 4 and len(base) == 4 and tuple(shape) != base:
        return f"{module.kind} kernel {tuple(shape[2:])}, base kernel {base[2:]}"
    return None


def _arch_from_names(components: Mapping[str, Mapping[str, ModuleSpec]]) -> str | None:
    """The architecture a base's module names point to (bases given as names and shapes only)."""
    unet = components.get("unet", {})
    if "transformer" in components:
        return _dit_arch(components["transformer"])
    if "text_encoder_2" in components or "add_embedding.linear_1" in unet:
        return "sdxl"
    if "down_blocks.0.attentions.0.proj_in" in unet and unet["down_blocks.0.attentions.0.proj_in"].kind == "conv2d":
        return "sd15"
    return None


def _class_names(obj: Any) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def _described_arch(base: Any, parts: Mapping[str, Any]) -> str | None:
    """The architecture whose description (`arches.ARCHES`) names the pipeline's class (subclasses
    too), or the denoiser component's model class where one architecture alone has it (Flux's and
    SD3's transformers; SD1.5 and SDXL share UNet2DConditionModel, their module names tell them apart).
    None for shape mappings and for classes no description names."""
    if not isinstance(base, Mapping):
        names = _class_names(base)
        for arch in ARCHES.values():
            if arch.pipeline_class in names:
                return arch.name
    for arch in ARCHES.values():
        model = parts.get(arch.denoiser)
        if model is None or isinstance(model, Mapping):
            continue
        if sum(a.denoiser_class == arch.denoiser_class for a in ARCHES.values()) == 1 and \
                arch.denoiser_class in _class_names(model):
            return arch.name
    return None


def _dit_arch(paths: Mapping[str, Any]) -> str | None:
    """"flux" or "sd3" from a transformer's module paths, None when they do not tell."""
    if any(p.startswith(("single_transformer_blocks.", "time_text_embed.guidance_embedder.")) for p in paths):
        return "flux"
    if any(p.startswith("pos_embed.") or ".attn2." in p for p in paths):
        return "sd3"
    # Flux has 19 double-stream blocks (0..18); SD3.5 large has 38 joint blocks
    if any(int(m.group(1)) >= 19 for m in map(_DIT_BLOCK.match, paths) if m):
        return "sd3"
    return None


_DIT_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def arch_label(arch: str) -> str:
    """How users write an architecture ("SDXL", "Flux"), from `arches.ARCHES`; the bare name for one
    not described there."""
    return ARCHES[arch].label if arch in ARCHES else arch


def guess_architecture(lora: LoRA) -> tuple[str | None, tuple[str, ...]]:
    """("sd15" | "sdxl" | "flux" | "sd3" | None, reasons) from the LoRA's module paths alone."""
    if "transformer" in lora.components:
        modules = lora.components["transformer"]
        arch = _dit_arch(modules)
        if arch is None:
            return None, ()
        first = next((p for p in modules if _dit_arch([p]) == arch), next(iter(modules)))
        return arch, (f"{arch_label(arch)} module path {first} ({modules[first].key})",)
    sdxl: list[str] = []
    sd15: list[str] = []
    if "text_encoder_2" in lora.components:
        first = next(iter(lora.components["text_encoder_2"].values()))
        sdxl.append(f"it has text_encoder_2 keys ({first.key})")
    for path, module in lora.components.get("unet", {}).items():
        m = _TRANSFORMER_INDEX.search("." + path)
        if path.startswith("add_embedding.") or (m and int(m.group(1)) >= 1):
            if len(sdxl) < 3:
                sdxl.append(f"SDXL-only module path {path} ({module.key})")
        elif path.startswith(("down_blocks.0.attentions.", "down_blocks.3.", "up_blocks.3.")):
            if len(sd15) < 3:
                sd15.append(f"SD1.x-only module path {path} ({module.key})")
    if sdxl and not sd15:
        return "sdxl", tuple(sdxl)
    if sd15 and not sdxl:
        return "sd15", tuple(sd15)
    return None, tuple(sdxl + sd15)


def match_lora(lora: LoRA, base: Any) -> MatchReport:
    """Pair every module of `lora` with the base's module of the same path and check its shape.
    Nothing is modified; `base` is anything `base_spec` takes."""
    spec = base_spec(base)
    matched, unmatched, mismatched = [], [], []
    for component, path, module in lora.modules():
        target = spec.components.get(component, {}).get(path)
        if target is None:
            unmatched.append((component, path, module.key))
            continue
        reason = _fits(module, target)
        if reason is None:
            matched.append((component, path))
        else:
            mismatched.append(ShapeMismatch(component, path, module.key, tuple(module.shape), target.shape, reason))
    lora_arch, reasons = guess_architecture(lora)
    return MatchReport(tuple(matched), tuple(unmatched), tuple(mismatched), lora_arch, spec.arch, reasons)


def check_lora(lora: LoRA, base: Any, *, min_fraction: float = 1.0) -> MatchReport:
    """`match_lora`, raising `LoRAMatchError` when any module's shape disagrees with the base, when
    nothing matches, or when the matched share is below `min_fraction` (1.0: every module must
    match). The error lists the first unmatched keys and the architecture the LoRA looks made for."""
    report = match_lora(lora, base)
    where = lora.path
    made_for = ""
    if report.lora_arch and report.base_arch and report.lora_arch != report.base_arch:
        made_for = (
            f" This LoRA looks made for {arch_label(report.lora_arch)}, the base is "
            f"{arch_label(report.base_arch)}: " + "; ".join(report.hints) + "."
        )
    fix = (
        # "an SDXL" / "an SD3.5" (said "ess-dee"), "a Flux"
        f"load it on {'an' if arch_label(report.lora_arch).startswith('SD') else 'a'} {arch_label(report.lora_arch)} base."
        if made_for
        else "check that the LoRA was trained for this base model."
    )
    if report.mismatched:
        first = report.mismatched[0]
        raise LoRAMatchError(
            f"{len(report.mismatched)} of {report.total} LoRA modules do not fit the base's shapes; first: "
            f"{first.key} ({first.component}.{first.path}): {first.reason}.{made_for}",
            report=report,
            path=where,
            key=first.key,
            value=first.lora_shape,
            limit=first.base_shape,
            fix=fix,
        )
    if not report.matched or report.fraction < min_fraction:
        listed = ", ".join(f"{key} ({c}.{p})" for c, p, key in report.unmatched[:5])
        raise LoRAMatchError(
            f"{len(report.matched)} of {report.total} LoRA modules ({report.fraction:.0%}) match the base, "
            f"below the required {min_fraction:.0%}; first unmatched: {listed}.{made_for}",
            report=report,
            path=where,
            key=report.unmatched[0][2] if report.unmatched else None,
            value=report.fraction,
            limit=min_fraction,
            fix=fix if made_for or not report.matched else f"{fix} Or accept a partial match with min_fraction.",
        )
    return report
