"""Load a base model from a built-in preset, a diffusers folder, or a single-file checkpoint with a
local config folder, always offline.

`load_base` returns a LoadedBase: the live pipeline plus what the rest of LoRA Loom keys on
(architecture, dtype, device, fingerprint). The model pool owns the pipeline; wires carry only the
description.
"""
from __future__ import annotations

import bisect
import itertools
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..graph_runtime import file_fingerprint
from ..lora.arches import ARCHES
from . import arch as arch_mod
from .arch import BaseModelError
from ..atomic import atomic_dir
from . import auto_config, checks, devices, presets


@dataclass(frozen=True)
class LoadedBase:
    """A loaded base model.

    pipeline: the diffusers pipeline (of lora.arches' pipeline_class for its arch).
    arch: "sd15", "sdxl", "flux" or "sd3". dtype / device: where its weights live.
    fingerprint: "preset:<name>@<version>" for presets; "folder:sha256:<hex>" or
        "single-file:sha256:<hex>+config:sha256:<hex>" (content hashes, memoised on path, size
        and mtime by graph_runtime's file_fingerprint) for files, so it changes exactly when the weights
        or configs can.
    source: what was asked for (preset name or path), for messages.
    """

    pipeline: Any
    arch: str
    dtype: torch.dtype
    device: torch.device
    fingerprint: str
    source: str

    @property
    def dtype_name(self) -> str:
        """"fp32", "fp16" or "bf16"."""
        return devices.dtype_name(self.dtype)


def _pipeline_class(arch: str):
    import diffusers

    return getattr(diffusers, arch_mod.PIPELINE_CLASSES[arch])


def _extra_kwargs(arch: str) -> dict[str, Any]:
    # Real SD1.5 folders list a safety checker: skip loading it (hundreds of MB, and ComfyUI-style
    # workflows never run it). The SDXL pipeline has no such component.
    return {"safety_checker": None, "requires_safety_checker": False} if arch == "sd15" else {}


def _own_memory(pipe, checked: list, skip=()) -> None:
    """Give every CPU weight memory the process owns, each byte read once and held once.

    safetensors loads leave CPU tensors as views into the memory-mapped file: a later rewrite of
    that file would change a live model under the pool, and a truncation SIGBUSes the process at
    the next touch (as lora/safefile explains). So each checked weights file (``checked``: the
    headers ``check_weights`` returned) that the pipeline views is read into one owned buffer
    (``read_checked_file``: refused if the file is no longer in the state it was checked in; each
    tensor 64-byte aligned, as a fresh tensor is, since unaligned views change float results: a
    different BLAS path, 2e-7 on the SDXL text projection), and each weight that views the file
    takes the same bytes from that buffer: bit for bit what diffusers loaded. Which weight views
    which bytes is read from the process's own memory map (Linux's /proc/self/maps: the file's
    device and inode, and the offset in it), never guessed from names. Anything else is copied on
    its own, as are the weights of a file the pipeline views less than 90% of (its buffer would hold
    the rest for nothing). On other devices `.to()` already copied them. ``skip``: components whose
    weights are already in owned memory (read from single files by load_base).
    """
    from ..lora.safefile import read_checked_file

    tensors = {id(t): t for component in pipe.components.values()
               if isinstance(component, torch.nn.Module) and all(component is not m for m in skip)
               for t in itertools.chain(component.parameters(), component.buffers()) if t.device.type == "cpu"}
    for header, placed in _file_views(list(tensors.values()), checked):
        owned = read_checked_file(header, checks.CHECKPOINT)
        for tensor, key in placed:
            tensor.data = owned[key]
            del tensors[id(tensor)]
    for tensor in tensors.values():
        tensor.data = tensor.data.clone()


def _file_views(tensors: list, checked: list) -> list:
    """[(header, [(tensor, key)])]: the tensors that are exactly the tensor ``key`` of a checked file
    as mapped into this process (same device, inode, offset, dtype and shape), for the files they
    make up at least 90% of. Empty where the process's memory map cannot be read."""
    header_of = {(h.state.device, h.state.inode): h for h in checked if h.state is not None}
    maps = _mapped_files(set(header_of))
    if not maps:
        return []
    starts = [m[0] for m in maps]
    # file offset -> (key, info) of the tensor the header declares there, per file
    declared = {file: {h.data_start + info.data_offsets[0]: (key, info) for key, info in h.tensors.items() if info.nbytes}
                for file, h in header_of.items()}
    found: dict[tuple[int, int], list] = {}
    for tensor in tensors:
        address = tensor.data_ptr()
        i = bisect.bisect_right(starts, address) - 1
        if i < 0 or not tensor.is_contiguous() or address + tensor.nbytes > maps[i][1]:
            continue
        start, _, offset, file = maps[i]
        key, info = declared[file].get(offset + address - start, (None, None))
        if info is not None and info.torch_dtype == tensor.dtype and info.shape == tuple(tensor.shape):
            found.setdefault(file, []).append((tensor, key))
    return [(header_of[file], placed) for file, placed in found.items()
            if sum(t.nbytes for t, _ in placed) >= 0.9 * (header_of[file].size - header_of[file].data_start)]


def _mapped_files(files: set) -> list[tuple[int, int, int, tuple[int, int]]]:
    """(start, end, file offset, (device, inode)) of this process's mappings of ``files`` (a set of
    (device, inode)), by start address; [] where /proc/self/maps cannot be read."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    maps = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[4] == "0":
            continue
        try:
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            key = (os.makedev(major, minor), int(fields[4]))
            if key in files:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                maps.append((start, end, int(fields[2], 16), key))
        except ValueError:
            continue
    return sorted(maps)


@dataclass(frozen=True)
class BaseIdentity:
    """What a base model is, known before any weight is read: what the model pool keys on, so a
    base already in the pool is never built a second time.

    source: what was asked for (preset name or path), for messages. kind: "preset", "folder" or
    "single-file". config: the config folder of a single file. arch, dtype, device and
    fingerprint: as in LoadedBase ("auto" already resolved).
    """

    source: str
    kind: str
    arch: str
    dtype: torch.dtype
    device: torch.device
    fingerprint: str
    config: Path | None = None
    tokenizers: tuple[tuple[str, str | None, str | None], ...] = ()
    """config "auto": (tokenizer component, folder of its files or None for the built-in one, pad token
    or None for the tokenizer's own)."""
    parts: tuple[tuple[str, str, str], ...] = ()
    """config "auto" on a Flux / SD3.5 transformer file: (component, file holding its weights, key prefix there)."""

    @property
    def dtype_name(self) -> str:
        """"fp32", "fp16" or "bf16"."""
        return devices.dtype_name(self.dtype)


_checked_folders: dict[tuple[str, str], checks.CheckedFolder] = {}


def _check_folder(path: Path, fingerprint: str, weights: bool = True, config_only: tuple[str, ...] = ()
                  ) -> checks.CheckedFolder:
    """checks.check_folder, remembered by content fingerprint: a folder is checked once per content."""
    key = (os.path.realpath(path), f"{fingerprint}:{weights}:{','.join(config_only)}")
    if key not in _checked_folders:
        _checked_folders[key] = checks.check_folder(path, weights, config_only)
    return _checked_folders[key]


def _is_dit(arch: str) -> bool:
    return ARCHES[arch].denoiser == "transformer"


def _config_check(config: Path, arch: str) -> checks.CheckedFolder:
    """The config folder of a single file, checked. A Flux / SD3.5 file holds the transformer alone
    (as flux1-dev.safetensors ships), so the folder must bring every other component's weights and
    only the transformer's config; an SD1.5 / SDXL file holds the whole pipeline."""
    if _is_dit(arch):
        _check_weights_of(config, ("transformer",))  # before the fingerprint, which then reads nothing again
        return _check_folder(config, file_fingerprint(config), weights=True, config_only=("transformer",))
    return _check_folder(config, file_fingerprint(config), weights=False)


def _check_single_file(path: Path, config: str | Path | None, tokenizer_dirs: Sequence[Path] = (),
                       part_dirs: Mapping[str, Sequence[Path]] | None = None
                       ) -> tuple[str, Path, auto_config.AutoConfig | None]:
    """The architecture of a single-file checkpoint, its checked config folder and, for config None
    ("auto"), what bases.auto_config found (the folder is then written from it). Only headers are
    read here; load_base checks every value before diffusers opens a file."""
    if path.suffix.lower() != ".safetensors":
        raise BaseModelError(
            f"{path}: only .safetensors checkpoints are loaded ({path.suffix or 'no suffix'} files may "
            "be pickles, which can run code).", value=path.suffix, limit=".safetensors",
            fix="convert it to .safetensors first"
        )
    header = checks.weights_header(path)
    arch = arch_mod.detect_checkpoint_arch(header.tensors, str(path))
    auto = None
    if config is None:
        auto = auto_config.auto_config({k: info.shape for k, info in header.tensors.items()}, header.metadata, arch,
                                       str(path), tokenizer_dirs, part_dirs)
        config = _auto_folder(auto)
    config = Path(config)
    if not config.is_dir():
        raise BaseModelError(f"config folder {config} for {path}: no such folder.", value=str(config), kind="not_found",
                             fix="pass the folder that holds model_index.json")
    config_arch = arch_mod.detect_folder_arch(config)
    if config_arch != arch:
        raise BaseModelError(
            f"single-file checkpoint {path} is {arch}, but config folder {config} describes {config_arch}.",
            value=config_arch, limit=arch, fix=f"pass a config folder of an {arch} pipeline"
        )
    if auto is not None and auto.parts:
        # every part's config was derived from the header of the file holding it, and each model is
        # compared key by key and shape by shape with its file before it is allocated (_parts_from_files)
        _check_folder(config, file_fingerprint(config), weights=False)
        return arch, config, auto
    shapes = _config_check(config, arch).shapes
    checks.check_budget(config, f"the {'transformer' if _is_dit(arch) else 'pipeline'}", shapes,
                        header.tensors.values(), path)
    return arch, config, auto


_auto_root: tempfile.TemporaryDirectory | None = None
_auto_lock = threading.Lock()


def _auto_folder(auto: auto_config.AutoConfig) -> Path:
    """The config folder written from ``auto``, once per content for this process (in a temporary
    folder removed when the process ends: it is a few kB of JSON, derived again in microseconds)."""
    global _auto_root
    with _auto_lock:
        if _auto_root is None:
            _auto_root = tempfile.TemporaryDirectory(prefix="loraloom-auto-config-")
        folder = Path(_auto_root.name) / auto.fingerprint
        if not folder.is_dir():
            with atomic_dir(folder) as stage:
                auto.write(stage)
        return folder


def _check_weights_of(folder: Path, config_only: tuple[str, ...] = ()) -> None:
    """Check every value of a diffusers folder's weights files on the read that also hashes each
    (``check_weights`` remembers the digest): the folder's fingerprint then reads no weights file
    again, and ``load_base`` finds them checked. One read of each file for both, not two.
    Components in ``config_only`` (a single file's transformer) need no weights here."""
    components = checks.check_model_index(folder)
    for name in checks.MODEL_COMPONENTS:
        if name not in config_only and components.get(name, (None, None)) != (None, None):
            for path in checks.weight_files(folder, name):
                checks.check_weights(path)


def identify_base(
    source: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    config: str | Path | None = None,
    tokenizer_dirs: Sequence[str | Path] = (),
    part_dirs: Mapping[str, Sequence[str | Path]] | Sequence[tuple[str, Sequence[str | Path]]] | None = None,
) -> BaseIdentity:
    """Check a base's arguments and say what it is, reading configs and hashing files (memoised)
    but building nothing. Every config and weights header is checked here, and every weights value,
    on the read that hashes the file (see bases.checks). Arguments as for load_base; it raises the
    same errors."""
    config = None if config == "auto" else config
    torch_dtype, torch_device = devices.resolve(dtype, device)
    name = str(source)
    if isinstance(source, str) and source in presets.PRESETS:
        if config is not None:
            raise BaseModelError(f"preset {source!r} takes no config folder (config={config!r}).", value=config,
                                 fix="drop config")
        preset = presets.get_preset(source)
        return BaseIdentity(name, "preset", preset.arch, torch_dtype, torch_device, preset.fingerprint)
    path = Path(source)
    if path.is_dir():
        if config is not None:
            raise BaseModelError(
                f"{path} is a diffusers folder and carries its own configs; config={config!r} is only for "
                "single-file checkpoints.", value=config, fix="drop config"
            )
        arch = arch_mod.detect_folder_arch(path)
        _check_weights_of(path)
        digest = file_fingerprint(path)
        _check_folder(path, digest)
        return BaseIdentity(name, "folder", arch, torch_dtype, torch_device, f"folder:sha256:{digest}")
    if path.is_file():
        arch, config, auto = _check_single_file(
            path, config, [Path(d) for d in tokenizer_dirs],
            {kind: [Path(d) for d in dirs] for kind, dirs in dict(part_dirs or {}).items()})
        checks.check_weights(path)  # hashes as it checks: file_fingerprint(path) reads nothing again
        digest = f"single-file:sha256:{file_fingerprint(path)}+config:sha256:{file_fingerprint(config)}"
        tokenizers, parts = (), ()
        if auto is not None:
            parts = tuple((component, str(file), prefix) for component, (file, prefix) in sorted(auto.parts.items()))
            for file in auto.part_files(path):
                checks.check_weights(file)  # hashes as it checks, as above
            tokenizers = tuple((name, None if folder is None else str(folder), pad)
                               for name, (folder, pad) in sorted(auto.tokenizers.items()))
            digest += auto.files_fingerprint(path)
        return BaseIdentity(name, "single-file", arch, torch_dtype, torch_device, digest, config, tokenizers, parts)
    raise BaseModelError(
        f"{name!r} is neither a preset ({', '.join(presets.PRESETS)}) nor an existing file or folder.",
        value=name, limit=list(presets.PRESETS), kind="not_found",
        fix="give a preset name, a diffusers folder or a .safetensors checkpoint path"
    )


def _transformer_from_file(tensors: Mapping[str, torch.Tensor], identity: BaseIdentity) -> torch.nn.Module:
    """The Flux / SD3.5 transformer of an original-layout single file (``tensors``: its checked bytes
    read into owned memory; an all-in-one file's other parts left out), renamed and split to
    diffusers' keys (bases.dit_file), every key and shape compared with the model the config folder
    describes, then placed into that
    model (built on the meta device, so nothing is allocated twice). diffusers' own single-file
    loader is not used: its Flux converter assumes the real model's width (see bases.dit_file)."""
    import diffusers

    from . import dit_file

    path = Path(identity.source)
    state = dit_file.to_diffusers(tensors, identity.arch, str(path))
    cls = getattr(diffusers, ARCHES[identity.arch].denoiser_class)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(identity.config / "transformer", local_files_only=True))
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for key in sorted(set(expected) ^ set(state)):
        where = "lacks" if key in expected else "has, and the config's model has no,"
        raise BaseModelError(
            f"{path}: the file {where} transformer weight {key!r} ({len(state)} weights in the file, {len(expected)} "
            f"in the model of {identity.config}): file and config are of different models.", file=path, key=key,
            value=len(state), limit=len(expected), kind="config_mismatch",
            fix="use the config folder that came with these weights")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise BaseModelError(
                f"{path}: transformer weight {key!r} has shape {list(state[key].shape)}; the config in "
                f"{identity.config} describes {list(shape)}.", file=path, key=key, value=list(state[key].shape),
                limit=list(shape), kind="config_mismatch", fix="use the config folder that came with these weights")
    model.load_state_dict({key: value.to(identity.dtype) for key, value in state.items()}, strict=True, assign=True)
    return model.eval()


def _tokenizers(identity: BaseIdentity) -> dict[str, Any]:
    """The tokenizer objects config "auto" found (none: the config folder brings its own)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    built = {}
    for name, folder, pad in identity.tokenizers:
        encoder = name.replace("tokenizer", "text_encoder")
        config = arch_mod.read_config(identity.config / encoder / "config.json", "the text encoder's config")
        if config.get("model_type") == "t5":
            # the pipelines pad T5 prompts to their own max_sequence_length, not the tokenizer's
            length = ARCHES[identity.arch].sampling.max_sequence_length
            built[name] = presets.build_t5_tokenizer(length) if folder is None else \
                T5TokenizerFast.from_pretrained(folder, local_files_only=True, model_max_length=length)
        elif folder is None:
            built[name] = presets.build_tokenizer(pad_token=pad)
        else:
            # The pipelines pad every prompt to the tokenizer's model_max_length, which must be the
            # text encoder's context; tokenizer files may say otherwise (ComfyUI's sd1_tokenizer says
            # 8192: it cuts prompts into 77-token chunks itself).
            built[name] = CLIPTokenizer.from_pretrained(folder, pad_token=pad, local_files_only=True,
                                                        model_max_length=config["max_position_embeddings"])
    return built


# Keys a text encoder file may hold that the model has no weight for: buffers transformers rebuilds
# (position ids), CLIP's contrastive temperature, and a projection a pipeline does not use (Flux
# pools CLIP-L's hidden state). Anything else unmatched is refused: nothing is dropped silently.
_SPARE_KEYS = ("embeddings.position_ids", "logit_scale", "text_projection.weight")


def _place(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, file: Path, what: str,
           spare: tuple[str, ...] = ()) -> torch.nn.Module:
    """Load ``state`` into ``model`` (built on the meta device) after comparing every key and shape,
    so a file that is not of this model is named, never half-loaded; tied weights (T5's embedding)
    may be absent. Each value is cast to ``dtype``."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    tied = set(expected) - set(checks.distinct_tensors(model))
    extra = sorted(k for k in set(state) - set(expected) if not k.endswith(spare))
    missing = sorted(set(expected) - set(state) - tied)
    for key in extra[:1] + missing[:1]:
        where = "has, and the model has no," if key in state else "lacks"
        raise BaseModelError(f"{file}: the {what} file {where} weight {key!r} ({len(state)} weights in the file, "
                             f"{len(expected)} in the model its config describes).", file=file, key=key,
                             value=len(state), limit=len(expected), kind="part_mismatch",
                             fix=f"use the {what} file of this model (or a config folder)")
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise BaseModelError(f"{file}: {what} weight {key!r} has shape {list(state[key].shape)}; the model needs "
                                 f"{list(shape)}.", file=file, key=key, value=list(state[key].shape), limit=list(shape),
                                 kind="part_mismatch", fix=f"use the {what} file of this model (or a config folder)")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items() if k in expected}, strict=False, assign=True)
    if tied:
        model.tie_weights()
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # buffers no file holds: CLIP's position ids, rebuilt as transformers builds them
            if not name.endswith("position_ids"):
                raise BaseModelError(f"{file}: the {what}'s buffer {name!r} is in no file and cannot be rebuilt.",
                                     file=file, key=name, kind="part_mismatch", fix="use a config folder")
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(
                attr, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    return model.eval()


def _parts_from_files(read: Mapping[Path, dict[str, torch.Tensor]], identity: BaseIdentity) -> dict[str, Any]:
    """The text encoders and VAE of a Flux / SD3.5 pipeline from the files config "auto" found
    (``read``: each file's checked tensors, read into owned memory), each built on the meta device
    from its derived config, its keys renamed where the file's layout is not diffusers'/transformers'
    (the VAE's LDM names, through diffusers' own converter), compared and placed."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    built = {}
    for component, file, prefix in identity.parts:
        state = {k.removeprefix(prefix): v for k, v in read[Path(file)].items() if k.startswith(prefix)}
        config = arch_mod.read_config(identity.config / component / "config.json", f"the {component}'s config")
        if component == "vae":
            with torch.device("meta"):
                model = diffusers.AutoencoderKL.from_config(config)
            state = convert_ldm_vae_checkpoint(state, config)
            what = "VAE"
        else:
            cls = getattr(transformers, config["architectures"][0])
            config_cls = transformers.T5Config if config.get("model_type") == "t5" else transformers.CLIPTextConfig
            with torch.device("meta"):
                model = cls(config_cls(**{k: v for k, v in config.items() if k != "architectures"}))
            if not any(k.startswith("text_model.") for k in model.state_dict()):
                # files keep CLIP's text_model. level; transformers 5's CLIPTextModel has none
                state = {k.removeprefix("text_model."): v for k, v in state.items()}
            what = "T5 encoder" if config.get("model_type") == "t5" else "CLIP text encoder"
        built[component] = _place(model, state, identity.dtype, Path(file), what, _SPARE_KEYS)
    return built


def load_base(
    source: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    config: str | Path | None = None,
    tokenizer_dirs: Sequence[str | Path] = (),
    part_dirs: Mapping[str, Sequence[str | Path]] | Sequence[tuple[str, Sequence[str | Path]]] | None = None,
) -> LoadedBase:
    """Load a base model, offline.

    source: a preset name (see presets.PRESETS), a diffusers folder (model_index.json inside), or a
        single-file .safetensors checkpoint in the original layout: SD1.5 (LDM) / SDXL (SGM) whole
        pipelines; Flux (BFL names, bare or under ComfyUI's "model.diffusion_model.") / SD3.5
        (MMDiT names) transformers, alone or all-in-one with some or all of their other parts.
    config: for a single file only, the local folder with model_index.json, component configs and
        tokenizers (a diffusers folder of the same architecture, or a config skeleton); for a Flux /
        SD3.5 transformer file it must hold the text encoders' and VAE's weights too. None or
        "auto": an SD1.5 / SDXL file's configs come from the file itself (bases.auto_config: the
        exact ones our SaveCheckpoint recorded, else derived from its shapes), its CLIP tokenizer
        from ``tokenizer_dirs`` (searched in order), then the Hugging Face cache (offline). A Flux /
        SD3.5 file's other parts (CLIP-L, CLIP-G, T5-XXL, VAE) come from the file itself or, by their
        usual names (clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors ...), from
        ``part_dirs`` {"text_encoders": [...], "vae": [...]}, its T5 tokenizer from
        ``part_dirs["t5_tokenizer"]`` (bases.dit_parts), every config derived from a header.
    dtype: "auto" | "fp32" | "fp16" | "bf16"; device: "auto" | "cpu" | "cuda" | "cuda:N".
        "auto" means cuda + fp16 when CUDA is available, else cpu + fp32.
    """
    identity = identify_base(source, dtype, device, config, tokenizer_dirs, part_dirs)
    if identity.kind == "preset":
        pipe = presets.build_pipeline(identity.source, dtype=identity.dtype, device=identity.device)
        return LoadedBase(pipe, identity.arch, identity.dtype, identity.device, identity.fingerprint, identity.source)
    cls = _pipeline_class(identity.arch)
    common = {"dtype": identity.dtype, "local_files_only": True, **_extra_kwargs(identity.arch)}
    # Every value of every weights file is checked before diffusers opens it (remembered per file
    # state, so a base evicted from the pool and loaded again is not read through twice).
    if identity.kind == "folder":
        checked = _check_folder(Path(identity.source), file_fingerprint(identity.source))
        weights = [header.path for header in checked.headers]
    else:
        weights = [Path(identity.source)]
        if identity.parts:
            weights += sorted({Path(file) for _, file, _ in identity.parts} - {Path(identity.source)})
        elif _is_dit(identity.arch):
            weights += [header.path for header in _config_check(identity.config, identity.arch).headers]
    scanned = [checks.check_weights(path) for path in weights]
    own: dict[str, torch.nn.Module] = {}
    try:
        if identity.kind == "folder":
            pipe = cls.from_pretrained(identity.source, use_safetensors=True, **common)
        elif _is_dit(identity.arch):
            from ..lora.safefile import read_checked_file

            # each file read once into owned memory; an all-in-one file's other parts go to their models
            read = {Path(h.path): read_checked_file(h, checks.CHECKPOINT)
                    for h in (scanned if identity.parts else scanned[:1])}
            prefixes = tuple(prefix for _, file, prefix in identity.parts if prefix and Path(file) == weights[0])
            own = _parts_from_files(read, identity) if identity.parts else {}
            own["transformer"] = _transformer_from_file(
                {k: v for k, v in read[weights[0]].items() if not (prefixes and k.startswith(prefixes))}, identity)
            pipe = cls.from_pretrained(identity.config, **own, **_tokenizers(identity), use_safetensors=True, **common)
        else:
            pipe = cls.from_single_file(identity.source, config=str(identity.config), **_tokenizers(identity),
                                        **common)
    except BaseModelError:
        raise
    except Exception as exc:  # what the checks above could not foresee: the library's own words, as ours
        raise BaseModelError(f"diffusers could not load this base: {type(exc).__name__}: {str(exc)[:500]}",
                             file=identity.source, value=type(exc).__name__, kind="load_failed") from None
    checks.unchanged_since_checked(scanned)
    # Loaders may return a subclass or a variant; the pipeline must agree with what the files said.
    loaded_arch = arch_mod.detect_pipeline_arch(pipe)
    if loaded_arch != identity.arch:
        raise BaseModelError(f"{identity.source}: files describe {identity.arch} but diffusers built a {loaded_arch} "
                             "pipeline", value=loaded_arch, limit=identity.arch)
    pipe = pipe.to(identity.device)
    _own_memory(pipe, scanned, skip=own.values())
    pipe.set_progress_bar_config(disable=True)  # progress goes through the runtime's events
    return LoadedBase(pipe, identity.arch, identity.dtype, identity.device, identity.fingerprint, identity.source)
