"""The model pool: owns live pipelines and moves them between states, exactly.

Wires carry small immutable values (:class:`BaseModel`, :class:`ModelRecipe`); the pool owns the
one live pipeline per base and *materialises* a recipe on it with the least work:

- every LoRA — blended (unfused) or fused — is applied by patching weights in place,
  ``W = W0 + sum(coeff * delta)``, computed from the pristine backup ``W0`` in float32 and cast once;
- the backup of a layer is taken the first time a layer is touched; restoring is a copy of it, so
  unfusing is bit-for-bit exact in every dtype, after any number of fuses of any number of LoRAs;
- only layers whose patch changed are rewritten; in-place writes keep a compiled UNet's graph valid
  (parameters are graph inputs), so weight changes, LoRA swaps and re-fusing do not recompile.

Why patch instead of diffusers' adapters: patched sampling runs at the plain base's speed, covers
every layer kind (LoCon, LoHa, LoKr, per-block weights on resnets too), and makes restore exact;
diffusers' ``unfuse_lora`` leaves 1.5e-3 error in bf16 and cannot unfuse several LoRAs. The maths is
what ``set_adapters`` + ``fuse_lora`` mean (tests compare against them).
"""

from __future__ import annotations

import itertools
import operator
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..lora.canonical import LoRA, delta
from ..lora.match import base_spec
from .loading import LoadedBase, load_base

DEFAULT_MAX_BASES = 2
_lora_of = operator.attrgetter("lora")


@dataclass(frozen=True)
class BaseModel:
    """A handle on a base model: what it is, never the live pipeline (the pool owns that)."""

    source: str
    arch: str
    dtype: str
    device: str
    fingerprint: str
    config: str | None = None

    @property
    def key(self) -> tuple:
        return (self.fingerprint, self.dtype, self.device)


@dataclass(frozen=True)
class Application:
    """One LoRA applied to a model: its weight on the UNet, on the text encoders, and optional
    per-module multipliers (block weights) ``{component: {module_path: scale}}``."""

    lora: LoRA
    name: str
    weight: float = 1.0
    text_encoder_weight: float = 1.0
    module_scales: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def coefficient(self, component: str, path: str) -> float:
        scale = self.module_scales.get(component, {}).get(path, 1.0)
        return (self.weight if component == "unet" else self.text_encoder_weight) * scale

    def __loraloom_parts__(self) -> tuple:
        """What the runtime's cache counts: the LoRA (its tensors are shared, not copied)."""
        return (self.lora,)


@dataclass(frozen=True)
class CompileOptions:
    """``torch.compile`` options for the UNet."""

    mode: str = "default"
    fullgraph: bool = False
    dynamic: bool = False
    channels_last: bool = False


@dataclass(frozen=True)
class ModelRecipe:
    """What a model should be: a base, LoRAs fused into it, LoRAs active on top (scaled at sampling
    time by ``lora_scale``, like diffusers' unfused adapters), and compile options."""

    base: BaseModel
    fused: tuple[Application, ...] = ()
    adapters: tuple[Application, ...] = ()
    compile: CompileOptions | None = None

    def describe(self) -> str:
        parts = [f"{self.base.source} ({self.base.arch}, {self.base.dtype})"]
        parts += [f"fused {a.name} x{a.weight:g}" for a in self.fused]
        parts += [f"{a.name} x{a.weight:g}" for a in self.adapters]
        if self.compile:
            parts.append("compiled")
        return " + ".join(parts)

    def __loraloom_parts__(self) -> list[LoRA]:
        """What the runtime's cache counts: the distinct applied LoRAs, whose tensors are shared with
        the LoadLoRA outputs and every other recipe holding them, so the cache counts them once.
        Distinct by identity here: a chain of blends applies one LoRA many times, and each recipe in
        it is sized once, so this keeps sizing a long chain cheap."""
        return list(dict.fromkeys(map(_lora_of, itertools.chain(self.fused, self.adapters))))


@dataclass
class _Live:
    loaded: LoadedBase
    spec: Any
    backups: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    applied: dict[tuple[str, str], tuple] = field(default_factory=dict)
    compiled: CompileOptions | None = None


class ModelPool:
    """Live pipelines by base (fingerprint, dtype, device), least recently used first out."""

    def __init__(self, max_bases: int = DEFAULT_MAX_BASES,
                 loader: Callable[..., LoadedBase] = load_base):
        self.max_bases = max_bases
        self._loader = loader
        self._live: OrderedDict[tuple, _Live] = OrderedDict()
        self._lock = threading.RLock()
        self.stats = {"loads": 0, "patched_layers": 0, "restored_layers": 0, "compiles": 0}

    def load(self, source: str, dtype: str = "auto", device: str = "auto", config: str | None = None) -> BaseModel:
        """Load a base (preset name, diffusers folder or single file) and return its handle."""
        with self._lock:
            loaded = self._loader(source, dtype=dtype, device=device, config=config)
            handle = BaseModel(source=str(source), arch=loaded.arch, dtype=loaded.dtype_name,
                               device=str(loaded.device), fingerprint=loaded.fingerprint,
                               config=str(config) if config else None)
            if handle.key not in self._live:
                self._admit(handle, loaded)
            self._live.move_to_end(handle.key)
            return handle

    def _admit(self, handle: BaseModel, loaded: LoadedBase) -> _Live:
        while len(self._live) >= self.max_bases:
            self._live.popitem(last=False)
        live = _Live(loaded, base_spec(loaded.pipeline))
        self._live[handle.key] = live
        self.stats["loads"] += 1
        return live

    def _get(self, base: BaseModel) -> _Live:
        live = self._live.get(base.key)
        if live is None:  # evicted, or a cached handle from an earlier pool: load it again
            loaded = self._loader(base.source, dtype=base.dtype, device=base.device, config=base.config)
            live = self._admit(base, loaded)
        self._live.move_to_end(base.key)
        return live

    def spec(self, base: BaseModel):
        """Names and shapes of the base's LoRA-targetable modules (for matching LoRAs)."""
        with self._lock:
            return self._get(base).spec

    def pipeline(self, recipe: ModelRecipe, lora_scale: float = 1.0, check_interrupt: Callable[[], None] | None = None):
        """The live pipeline, in the state ``recipe`` describes (``lora_scale`` multiplies the
        unfused LoRAs). Only layers whose patch changed are written. If anything fails midway the
        base is restored to its plain weights, so the pool stays in a known state."""
        with self._lock:
            live = self._get(recipe.base)
            target = self._target(recipe, lora_scale)
            try:
                self._apply(live, target, check_interrupt)
                self._compile(live, recipe.compile)
            except BaseException:
                self._restore_all(live)
                raise
            return live.loaded.pipeline

    def plain(self, base: BaseModel):
        """The live pipeline with every touched layer restored to its original weights."""
        return self.pipeline(ModelRecipe(base))

    @staticmethod
    def _target(recipe: ModelRecipe, lora_scale: float) -> dict[tuple[str, str], tuple]:
        target: dict[tuple[str, str], list] = {}
        for group, factor in ((recipe.fused, 1.0), (recipe.adapters, lora_scale)):
            for app in group:
                for component, path, module in app.lora.modules():
                    coeff = factor * app.coefficient(component, path)
                    if coeff != 0.0:
                        target.setdefault((component, path), []).append((app.lora.fingerprint, coeff, module))
        return {k: tuple(v) for k, v in target.items()}

    def _apply(self, live: _Live, target: dict, check_interrupt) -> None:
        spec = live.spec
        pipe = live.loaded.pipeline
        stale = [k for k in live.applied if k not in target]
        changed = [k for k, v in target.items() if _signature(live.applied.get(k)) != _signature(v)]
        for component, path in stale:
            weight = _weight(pipe, spec, component, path)
            with torch.no_grad():
                weight.copy_(live.backups[(component, path)])
            del live.applied[(component, path)]
            self.stats["restored_layers"] += 1
        for i, key in enumerate(changed):
            if check_interrupt is not None and i % 16 == 0:
                check_interrupt()
            component, path = key
            weight = _weight(pipe, spec, component, path)
            backup = live.backups.get(key)
            if backup is None:
                backup = weight.detach().to("cpu", copy=True)
                live.backups[key] = backup
            with torch.no_grad():
                new = backup.to(weight.device, torch.float32, copy=True)  # never add into the backup
                for _fp, coeff, module in target[key]:
                    new.add_(delta(module, weight.shape).to(weight.device), alpha=coeff)
                weight.copy_(new.to(weight.dtype))
            live.applied[key] = target[key]
            self.stats["patched_layers"] += 1

    def _restore_all(self, live: _Live) -> None:
        pipe = live.loaded.pipeline
        with torch.no_grad():
            for (component, path), backup in live.backups.items():
                _weight(pipe, live.spec, component, path).copy_(backup)
        live.applied.clear()

    def _compile(self, live: _Live, options: CompileOptions | None) -> None:
        if options == live.compiled:
            return
        unet = live.loaded.pipeline.unet
        if options is None:
            unet._compiled_call_impl = None  # back to eager; the parameters are untouched
        else:
            # A persistent inductor cache makes the next process's compile take seconds, not minutes.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "loraloom" / "inductor"))
            if options.channels_last:
                unet.to(memory_format=torch.channels_last)
            unet.compile(mode=None if options.mode == "default" else options.mode,
                         fullgraph=options.fullgraph, dynamic=options.dynamic)
            self.stats["compiles"] += 1
        live.compiled = options

    def clear(self) -> None:
        """Drop every live pipeline (their memory is freed when nothing else holds them)."""
        with self._lock:
            self._live.clear()


def _signature(entries) -> tuple | None:
    if entries is None:
        return None
    return tuple((fp, coeff, id(module)) for fp, coeff, module in entries)


def _weight(pipe, spec, component: str, path: str) -> torch.Tensor:
    module = getattr(pipe, component).get_submodule(spec.model_name(component, path))
    return getattr(module, "base_layer", module).weight


def pool_from(resources: dict) -> ModelPool:
    """The pool kept in a runtime's ``resources`` (one per Runtime; a process-wide one in ComfyUI)."""
    pool = resources.get("model_pool")
    if pool is None:
        pool = resources["model_pool"] = ModelPool()
    return pool
