"""The model pool: owns live pipelines and moves them between states, exactly.

Wires carry small immutable values (:class:`BaseModel`, :class:`ModelRecipe`); the pool owns the
one live pipeline per base and *materialises* a recipe on it with the least work:

- every LoRA — blended (unfused) or fused — is applied by patching weights in place,
  ``W = W0 + sum(coeff * delta)``, computed from the pristine backup ``W0`` with fp32 accumulation and
  rounded once (all LoRA pairs of a layer in one matmul: `patch_weight`);
- the backup of a layer is taken the first time a layer is touched, in the weight's dtype (for GPU
  weights in pinned host memory or, if allowed, GPU memory); restoring is a copy of it, so
  unfusing is bit-for-bit exact in every dtype, after any number of fuses of any number of LoRAs;
- only layers whose patch changed are rewritten; in-place writes keep a compiled denoiser's graph valid
  (parameters are graph inputs), so weight changes, LoRA swaps and re-fusing do not recompile;
- everything else a recipe or a caller sets up belongs to one use, never to the base: each call
  returns a new view of the pipeline (its own scheduler; working tokenizers; the compiled denoiser
  where the recipe asks for it), and the denoiser's memory format follows the recipe. The base keeps
  its own scheduler, tokenizers and eager denoiser, so what one node ran before never shows in what
  another samples or saves.

The denoiser is the pipeline component the architecture names (`lora.arches`): the UNet of SD1.5 /
SDXL, the transformer of Flux / SD3.5; weights are found by module path in either the same way.

Why patch instead of diffusers' adapters: patched sampling runs at the plain base's speed, covers
every layer kind (LoCon, LoHa, LoKr, per-block weights on resnets too), and makes restore exact;
diffusers' ``unfuse_lora`` leaves 1.5e-3 error in bf16 and cannot unfuse several LoRAs. The maths is
what ``set_adapters`` + ``fuse_lora`` mean (tests compare against them).
"""

from __future__ import annotations

import copy
import itertools
import operator
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..graph_runtime import paths
from ..lora.arches import ARCHES, DENOISERS
from ..lora.canonical import LoRA, LoRAModule, delta, stacked_factors
from ..lora.match import base_spec
from .arch import BaseModelError
from .loading import BaseIdentity, LoadedBase, identify_base, load_base

DEFAULT_MAX_BASES = 2
_lora_of = operator.attrgetter("lora")

BACKUPS_ENV = "LORALOOM_BACKUPS"
BACKUP_PLACES = {
    "host": "pinned host memory (page-locked, so copies back to the GPU run asynchronously)",
    "device": "GPU memory while it has room (a re-patch then reads no host memory), else pinned host memory",
}
# GPU memory a device backup must leave free, for sampling (activations, the VAE).
DEVICE_BACKUP_RESERVE = 4 << 30
# Rows of a layer patched at once through the float32 path: 1 MiB of fp32, which stays in a CPU's
# L2 cache between the read of the backup, the matmul and the write into the weight.
CHUNK_BYTES = 1 << 20
# Layers smaller than this take the float32 path on a CPU too: a bf16 matmul there costs ~0.1 ms of
# set-up whatever its size, more than the float32 maths of a small layer.
BF16_MIN_NUMEL = 1 << 16


def _search(tokenizer_dirs, part_dirs) -> dict:
    """load_base's ``tokenizer_dirs`` / ``part_dirs`` keywords as hashable tuples of strings, those given only."""
    found = {"tokenizer_dirs": tuple(map(str, tokenizer_dirs)),
             "part_dirs": tuple((kind, tuple(map(str, dirs))) for kind, dirs in sorted(dict(part_dirs or {}).items()))}
    return {k: v for k, v in found.items() if v}


@dataclass(frozen=True)
class BaseModel:
    """A handle on a base model: what it is, never the live pipeline (the pool owns that)."""

    source: str
    arch: str
    dtype: str
    device: str
    fingerprint: str
    config: str | None = None
    tokenizer_dirs: tuple[str, ...] = ()
    """Where a single file's config "auto" looks for its tokenizer (see bases.auto_config)."""
    part_dirs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Where a Flux / SD3.5 file's config "auto" looks for its other parts, by folder kind (see bases.dit_parts)."""

    def search(self) -> dict:
        """The load_base keywords that say where config "auto" looks (none given: none passed)."""
        return _search(self.tokenizer_dirs, self.part_dirs)

    @property
    def key(self) -> tuple:
        return (self.fingerprint, self.dtype, self.device)


@dataclass(frozen=True)
class Application:
    """One LoRA applied to a model: its weight on the denoiser (UNet or transformer), on the text
    encoders, and optional per-module multipliers (block weights) ``{component: {module_path: scale}}``."""

    lora: LoRA
    name: str
    weight: float = 1.0
    text_encoder_weight: float = 1.0
    module_scales: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def coefficient(self, component: str, path: str) -> float:
        scale = self.module_scales.get(component, {}).get(path, 1.0)
        return (self.weight if component in DENOISERS else self.text_encoder_weight) * scale

    def __loraloom_parts__(self) -> tuple:
        """What the runtime's cache counts: the LoRA (its tensors are shared, not copied)."""
        return (self.lora,)


@dataclass(frozen=True)
class CompileOptions:
    """``torch.compile`` options for the denoiser (UNet or transformer)."""

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
        """One line: the base, then each application (a long list keeps its first and last few, so
        every node of a long blend chain shows a line of bounded length)."""
        parts = [f"{self.base.source} ({self.base.arch}, {self.base.dtype})"]
        parts += _describe_apps(self.fused, "fused ")
        parts += _describe_apps(self.adapters, "")
        if self.compile:
            parts.append("compiled")
        return " + ".join(parts)

    def __loraloom_parts__(self) -> list[LoRA]:
        """What the runtime's cache counts: the distinct applied LoRAs, whose tensors are shared with
        the LoadLoRA outputs and every other recipe holding them, so the cache counts them once.
        Distinct by identity here: a chain of blends applies one LoRA many times, and each recipe in
        it is sized once, so this keeps sizing a long chain cheap."""
        return list(dict.fromkeys(map(_lora_of, itertools.chain(self.fused, self.adapters))))


DESCRIBE_HEAD, DESCRIBE_TAIL = 12, 3


def _describe_apps(apps: tuple[Application, ...], prefix: str) -> list[str]:
    if len(apps) > DESCRIBE_HEAD + DESCRIBE_TAIL + 1:
        hidden = len(apps) - DESCRIBE_HEAD - DESCRIBE_TAIL
        return ([f"{prefix}{a.name} x{a.weight:g}" for a in apps[:DESCRIBE_HEAD]] + [f"({hidden} more)"]
                + [f"{prefix}{a.name} x{a.weight:g}" for a in apps[-DESCRIBE_TAIL:]])
    return [f"{prefix}{a.name} x{a.weight:g}" for a in apps]


@dataclass
class _Live:
    loaded: LoadedBase
    spec: Any
    working: dict[str, Any]  # components a run changes, copied once so the base's own stay as loaded
    backups: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    # each patched layer's weight Parameter, looked up once (patches and memory-format changes keep
    # the Parameter objects; only their values and layout change)
    weights: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    applied: dict[tuple[str, str], tuple] = field(default_factory=dict)
    compiled: dict[CompileOptions, torch.nn.Module] = field(default_factory=dict)
    channels_last: bool = False

    @property
    def denoiser(self) -> str:
        """The pipeline component that denoises: "unet" or "transformer"."""
        return ARCHES[self.loaded.arch].denoiser


@torch.no_grad()
def patch_weight(weight: torch.Tensor, source: torch.Tensor, entries: tuple) -> int:
    """Write ``source + sum(coeff * delta(module))`` over ``entries`` (``(fingerprint, coeff,
    module)``) into ``weight``, in place; returns the number of module deltas computed.

    ``source`` (the pristine weight, contiguous, on the weight's device) may be the weight itself.
    A module applied several times (a chain of blends) counts once, with its coefficients summed.
    Every LoRA pair of the layer goes into one matmul (`stacked_factors`); LoHa and LoKr modules
    add their full delta. bf16 weights on a CPU take one bf16 ``addmm`` straight into the weight
    (oneDNN accumulates in fp32, scales the sum by the widest LoRA's coefficient and rounds once;
    other LoRAs' factors go in relative to it, split into bf16 pairs where not exact; over 7x the
    speed of per-delta float32 maths on the SDXL UNet, and within one bf16 step of it); every other
    case runs float32 maths in row chunks that stay in cache, then casts once. The result depends
    only on ``source`` and ``entries``, never on what the weight held before.
    """
    terms = _combined(entries)
    low = [(c, m) for c, m in terms if isinstance(m, LoRAModule)]
    full = [(c, m) for c, m in terms if not isinstance(m, LoRAModule)]
    device = weight.device
    rows = weight.shape[0]
    cols = weight.numel() // rows
    in_place = weight.is_contiguous()  # row-major; a channels_last conv weight is written through a copy
    out = weight.detach() if in_place else torch.empty(weight.shape, dtype=weight.dtype, device=device)
    out2d, source2d = out.view(rows, cols), source.view(rows, cols)
    if low and not full and weight.dtype == torch.bfloat16 and device.type == "cpu" and weight.numel() >= BF16_MIN_NUMEL:
        up, down, scale = stacked_factors(low, torch.bfloat16)
        torch.addmm(source2d, up, down, alpha=scale, out=out2d)
    else:
        up, down, scale = stacked_factors(low) if low else (None, None, 1.0)
        if up is not None:
            up, down = up.to(device), down.to(device)
        deltas = [(c, delta(m, weight.shape).to(device).view(rows, cols)) for c, m in full]
        # on a GPU one chunk: each is a few kernel launches, and a layer's fp32 copy is small there
        step = rows if device.type != "cpu" else max(1, CHUNK_BYTES // (4 * cols))
        buffer = (None if weight.dtype == torch.float32
                  else torch.empty((min(step, rows), cols), dtype=torch.float32, device=device))
        for start in range(0, rows, step):
            chunk = out2d[start:start + step]
            acc = chunk if buffer is None else buffer[:chunk.shape[0]]
            acc.copy_(source2d[start:start + step])
            if up is not None:
                acc.addmm_(up[start:start + step], down, alpha=scale)
            for coeff, d in deltas:
                acc.add_(d[start:start + step], alpha=coeff)
            if acc is not chunk:
                chunk.copy_(acc)
    if not in_place:
        weight.copy_(out)
    return len(terms)


def _combined(entries: tuple) -> list[tuple[float, Any]]:
    """``(coeff, module)`` per distinct module, coefficients summed in order (zero sums dropped)."""
    sums: dict[int, list] = {}
    for _fp, coeff, module in entries:
        sums.setdefault(id(module), [0.0, module])[0] += coeff
    return [(coeff, module) for coeff, module in sums.values() if coeff != 0.0]


def _backup_place(place: str | None) -> str:
    value = place if place is not None else os.environ.get(BACKUPS_ENV, "host")
    if value not in BACKUP_PLACES:
        where = "backups" if place is not None else BACKUPS_ENV
        raise BaseModelError(f"{where} {value!r} is not a backup place; valid: {', '.join(BACKUP_PLACES)}",
                             key=where, value=value, limit=tuple(BACKUP_PLACES),
                             fix=f"use one of: {', '.join(BACKUP_PLACES)}")
    return value


def _backup(weight: torch.Tensor, place: str) -> torch.Tensor:
    """A contiguous copy of ``weight`` in its own dtype, where ``place`` says (GPU weights) or on the
    host. Contiguous whatever the weight's layout: the patch reads it by rows."""
    w = weight.detach()
    if w.device.type != "cuda":
        return w.to("cpu", copy=True, memory_format=torch.contiguous_format)
    if place == "device":
        free, _total = torch.cuda.mem_get_info(w.device)
        if free - w.numel() * w.element_size() > DEVICE_BACKUP_RESERVE:
            return w.clone(memory_format=torch.contiguous_format)
    host = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)  # pinning needs CUDA: only reached with it
    host.copy_(w)
    return host


class _Staging:
    """Host backups of GPU weights copied to the GPU one layer ahead, on a side stream, so the copy
    of the next layer's backup overlaps this layer's maths. Off a GPU (or for backups already on
    the weight's device) it hands the backup out as it is."""

    def __init__(self, backups: Mapping[tuple[str, str], torch.Tensor]):
        self._backups = backups
        self._streams: dict[torch.device, Any] = {}
        self._pending: dict[tuple[str, str], tuple[torch.Tensor, Any]] = {}

    def start(self, key: tuple[str, str], weight: torch.Tensor) -> None:
        """Begin copying ``key``'s backup to ``weight``'s GPU (no-op when there is nothing to copy)."""
        backup = self._backups.get(key)
        if backup is None or backup.device == weight.device or weight.device.type != "cuda":
            return
        stream = self._streams.get(weight.device)
        if stream is None:
            stream = self._streams[weight.device] = torch.cuda.Stream(weight.device)
        with torch.cuda.stream(stream):
            staged = backup.to(weight.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self._pending[key] = (staged, done)

    def take(self, key: tuple[str, str], weight: torch.Tensor) -> torch.Tensor:
        """``key``'s backup on ``weight``'s device, ready to be read by the current stream."""
        pending = self._pending.pop(key, None)
        if pending is None:
            self.start(key, weight)
            pending = self._pending.pop(key, None)
        if pending is None:
            backup = self._backups[key]
            return backup if backup.device == weight.device else backup.to(weight.device)
        staged, done = pending
        current = torch.cuda.current_stream(weight.device)
        current.wait_event(done)
        # allocated on the side stream, used on this one: the allocator must wait for this stream too
        staged.record_stream(current)
        return staged

    def __enter__(self) -> "_Staging":
        return self

    def __exit__(self, *exc) -> None:
        # wait for copies started but not taken (a patch that stopped early): none outlives it
        for stream in self._streams.values():
            stream.synchronize()
        self._pending.clear()


class ModelPool:
    """Live pipelines by base (fingerprint, dtype, device), least recently used first out.

    loader builds a base (load_base's signature); identify says what a base is without building it
    (identify_base's), so a base already held is never built again. backups says where the backups
    of GPU weights live (`BACKUP_PLACES`; default: the ``LORALOOM_BACKUPS`` environment variable, else
    "host"); CPU weights keep theirs in host memory."""

    patch_weight = staticmethod(patch_weight)  # the per-layer maths (a benchmark swaps in its reference)

    def __init__(self, max_bases: int = DEFAULT_MAX_BASES,
                 loader: Callable[..., LoadedBase] = load_base,
                 identify: Callable[..., BaseIdentity] = identify_base,
                 backups: str | None = None):
        self.max_bases = max_bases
        self.backups = _backup_place(backups)
        self._loader = loader
        self._identify = identify
        self._live: OrderedDict[tuple, _Live] = OrderedDict()
        self._lock = threading.RLock()
        self.stats = {"loads": 0, "patched_layers": 0, "restored_layers": 0, "compiles": 0, "deltas": 0}

    def load(self, source: str, dtype: str = "auto", device: str = "auto", config: str | None = None,
             tokenizer_dirs: tuple[str, ...] = (), part_dirs: Mapping[str, Sequence[str]] | None = None) -> BaseModel:
        """Load a base (preset name, diffusers folder or single file) and return its handle. The key
        (fingerprint, resolved dtype and device) comes first: a base the pool holds is not built again.
        ``tokenizer_dirs``, ``part_dirs``: see load_base (only a single file with config "auto" reads them)."""
        where = _search(tokenizer_dirs, part_dirs)
        with self._lock:
            identity = self._identify(source, dtype=dtype, device=device, config=config, **where)
            handle = BaseModel(source=str(source), arch=identity.arch, dtype=identity.dtype_name,
                               device=str(identity.device), fingerprint=identity.fingerprint,
                               config=str(config) if config else None, **where)
            self._get(handle)
            return handle

    def _get(self, base: BaseModel) -> _Live:
        live = self._live.get(base.key)
        if live is None:  # new, evicted, or a cached handle from an earlier pool: build it
            # make room first, so the pool never holds more than max_bases pipelines at once
            while len(self._live) >= self.max_bases:
                self._live.popitem(last=False)
            loaded = self._loader(base.source, dtype=base.dtype, device=base.device, config=base.config,
                                  **base.search())
            if loaded.fingerprint != base.fingerprint:
                raise BaseModelError(
                    f"base {base.source}: its files changed since it was identified", file=base.source,
                    value=loaded.fingerprint, limit=base.fingerprint, fix="run again, so LoadBase reads it anew")
            spec = base_spec(loaded.pipeline)  # its arch: the pipeline class's, as the loader checked it
            live = self._live[base.key] = _Live(loaded, spec, _working_copies(loaded.pipeline))
            self.stats["loads"] += 1
        self._live.move_to_end(base.key)
        return live

    def spec(self, base: BaseModel):
        """Names and shapes of the base's LoRA-targetable modules (for matching LoRAs)."""
        with self._lock:
            return self._get(base).spec

    def pipeline(self, recipe: ModelRecipe, lora_scale: float = 1.0, check_interrupt: Callable[[], None] | None = None):
        """A pipeline to run in the state ``recipe`` describes (``lora_scale`` multiplies the unfused
        LoRAs), for one use.

        Each call returns a new view of the base's pipeline: it shares the base's modules, whose
        weights the pool patches in place (only layers whose patch changed are written), and has its
        own fresh scheduler, the pool's working copies of the tokenizers and, under compile options,
        the compiled denoiser. Whatever a caller sets on the view (a scheduler for one sample) never
        reaches the base or another caller. If anything fails midway the base is restored to its
        plain weights, so the pool stays in a known state."""
        with self._lock:
            live = self._get(recipe.base)
            denoiser = self._materialise(live, recipe, lora_scale, check_interrupt)
            return _view(live.loaded.pipeline, live.denoiser, denoiser, **live.working)

    def pipeline_to_save(self, recipe: ModelRecipe, check_interrupt: Callable[[], None] | None = None):
        """A view of the base with every LoRA of ``recipe`` at its full weight, as ``save_pretrained``
        should write it: the base's own tokenizers (never run), scheduler config and eager denoiser,
        whatever ran on the pool before."""
        with self._lock:
            live = self._get(recipe.base)
            self._materialise(live, recipe, 1.0, check_interrupt)
            return _view(live.loaded.pipeline, live.denoiser, getattr(live.loaded.pipeline, live.denoiser))

    def plain(self, base: BaseModel):
        """A view of the base with every touched layer restored to its original weights."""
        return self.pipeline(ModelRecipe(base))

    def _materialise(self, live: _Live, recipe: ModelRecipe, lora_scale: float, check_interrupt) -> torch.nn.Module:
        """Bring the base's weights and memory format to ``recipe``; returns the denoiser to run."""
        target = self._target(recipe, lora_scale)
        try:
            self._apply(live, target, check_interrupt)
            return self._denoiser(live, recipe.compile)
        except BaseException:
            self._restore_all(live)
            raise

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
        for key in changed:
            if key not in live.weights:
                live.weights[key] = _weight(pipe, spec, *key)
        weights = [live.weights[key] for key in changed]
        staging = _Staging(live.backups)
        with torch.no_grad(), staging:
            for i, (key, weight) in enumerate(zip(changed, weights)):
                if check_interrupt is not None and i % 16 == 0:
                    check_interrupt()
                if key in live.backups:
                    source = staging.take(key, weight)
                else:
                    # stored before the weight is written: a failure from here on restores it
                    backup = live.backups[key] = _backup(weight, self.backups)
                    # a backup kept on the host is not copied back: the weight is still pristine
                    source = backup if backup.device == weight.device else weight.detach().contiguous()
                if i + 1 < len(changed):  # the next layer's host->device copy runs while this one computes
                    staging.start(changed[i + 1], weights[i + 1])
                self.stats["deltas"] += self.patch_weight(weight, source, target[key])
                live.applied[key] = target[key]
                self.stats["patched_layers"] += 1

    def _restore_all(self, live: _Live) -> None:
        pipe = live.loaded.pipeline
        with torch.no_grad():
            for (component, path), backup in live.backups.items():
                _weight(pipe, live.spec, component, path).copy_(backup)
        live.applied.clear()

    def _denoiser(self, live: _Live, options: CompileOptions | None) -> torch.nn.Module:
        """The denoiser to run under ``options``, its parameters in the memory format they ask for.

        ``torch.compile(module)`` returns a wrapper that shares the module's parameters and leaves
        the module itself eager, so the base keeps its eager denoiser and each options value gets its
        own wrapper, made once (compiling happens at its first call). The memory format belongs to
        the shared parameters, so it follows every recipe: channels_last only while one asks for it
        (it changes only 4-D weights: a transformer's patch embedding, a UNet's convolutions).
        """
        denoiser = getattr(live.loaded.pipeline, live.denoiser)
        channels_last = options is not None and options.channels_last
        if channels_last != live.channels_last:
            # Module.to rewrites each 4-D parameter's .data in place: the weights stay the same
            # Parameter objects, and the pool's backups hold values, not layouts.
            denoiser.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            live.channels_last = channels_last
        if options is None:
            return denoiser
        compiled = live.compiled.get(options)
        if compiled is None:
            use_inductor_cache_dir()
            compiled = live.compiled[options] = torch.compile(
                denoiser, mode=None if options.mode == "default" else options.mode,
                fullgraph=options.fullgraph, dynamic=options.dynamic)
            self.stats["compiles"] += 1
        return compiled

    def clear(self) -> None:
        """Drop every live pipeline (their memory is freed when nothing else holds them)."""
        with self._lock:
            self._live.clear()


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def inductor_cache_dir() -> Path:
    """Where torch.compile's inductor cache (compiled graphs, generated kernels) lives for LoRA Loom:
    ``$TORCHINDUCTOR_CACHE_DIR`` as it was when LoRA Loom was imported, else ``inductor`` in LoRA
    Loom's folder of the user's cache (``$XDG_CACHE_HOME/loraloom``, ``~/.cache/loraloom``;
    ``%LOCALAPPDATA%/loraloom`` on Windows).

    Torch's own default is ``torchinductor_<user>`` in the temp folder, which many systems empty at
    every reboot (or keep in RAM): the next run would pay the cold compile again (about two minutes
    for tiny-sdxl's UNet on this 2-core CPU, against about 20 s warm)."""
    if paths.INDUCTOR_CACHE_AT_IMPORT:
        return Path(paths.INDUCTOR_CACHE_AT_IMPORT)
    return paths.user_cache_root() / "inductor"


def use_inductor_cache_dir() -> Path:
    """Point torch's inductor cache at :func:`inductor_cache_dir` for this process, before a compile.
    Torch reads the variable at every cache lookup and write, so setting it before the first call of
    a compiled module is enough, even after torch wrote its own default into it."""
    folder = inductor_cache_dir()
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)
    return folder


# Calling a transformers tokenizer records the padding and truncation it was asked for in its
# backend, and save_pretrained writes that into tokenizer.json: a base's tokenizers that sampled once
# would save differently from ones that never ran. Runs use copies; the base's own are only saved.
_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def _working_copies(pipe) -> dict[str, Any]:
    """Copies of the components a run changes (the tokenizers), made once per base."""
    return {name: copy.deepcopy(getattr(pipe, name)) for name in _TOKENIZERS if getattr(pipe, name, None) is not None}


def _view(pipe, name: str, denoiser: torch.nn.Module, **parts):
    """A shallow copy of ``pipe`` that shares its modules, with ``denoiser`` as its component
    ``name`` ("unet" or "transformer"), a fresh scheduler and ``parts`` (components by name) in
    place of the base's.

    The copy has its own attribute table, and diffusers replaces (never edits) a pipeline's config
    dict when a component is assigned, so setting the view's scheduler or denoiser leaves ``pipe`` as
    it was. A fresh scheduler from the base's config: schedulers keep per-run state (step index,
    multistep history) that must not carry from one sample to the next.
    """
    view = copy.copy(pipe)
    setattr(view, name, denoiser)
    for name, part in parts.items():
        setattr(view, name, part)
    scheduler = getattr(pipe, "scheduler", None)  # a stand-in holding only a UNet has none
    if scheduler is not None:
        view.scheduler = type(scheduler).from_config(scheduler.config)
    return view


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
