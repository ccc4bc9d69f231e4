"""Checks on a base model's files before diffusers or transformers opens them.

A single-file checkpoint or a diffusers folder comes from strangers as often as a LoRA does, and
the libraries trust what they read: a config with ``block_out_channels`` of a million makes
diffusers allocate terabytes, ``sample_size`` 10^9 loads as is, a ``model_index.json`` naming
``["os", "system"]`` makes diffusers import and call it, NaN weights load silently, a truncated
weights file ends in a raw OSError. So every file is checked first, with the checks LoRA files get:

- weights (``*.safetensors``): lora/safefile's strict reader in the checkpoint role (header sanity,
  limits, dtypes, shapes, offsets, every tensor's values), pickles refused;
- configs (``*.json``): size-capped, strict JSON (no NaN, no duplicate keys, bounded depth), an
  object; ``model_index.json`` may name only the pipeline and component classes SD1.5 and SDXL use;
- model configs: count and size fields bounded, then the model is built on the meta device (no
  memory) and must hold no more values than its weights (a folder component's files, or the whole
  single file): nothing diffusers allocates can exceed what the weights themselves hold.

Every refusal is a BaseModelError naming the file, the key, the value and the limit.
"""
from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..graph_runtime import FileState, remember_fingerprint
from ..graph_runtime.cache import RACY_NS
from ..graph_runtime.errors import LoomError
from ..graph_runtime.files import FileError, path_state, read_capped
from ..lora.safefile import FileRole, Header, Limits, TensorInfo, inspect_header, scan_file
from .arch import BaseModelError, read_config

CHECKPOINT = FileRole(
    lambda path, problem, *, key=None, value=None, limit=None, fix=None, what="tensor": BaseModelError(
        problem, file=path, key=key, key_label=what, value=value, limit=limit, fix=fix),
    "checkpoint weights file", sizes="2 to 14 GB for SD1.5 and SDXL",
    tensors="an SDXL checkpoint has about 2,500",
    raise_limit="this is far beyond any SD1.5 or SDXL checkpoint ({field}); check where the file came from.",
    not_finite="the checkpoint is damaged or overflowed when it was saved in fp16: download it again or use "
               "another version (bf16 or fp32).",
)
"""The role of base model weights in lora/safefile's checks: refusals are BaseModelErrors."""

CHECKPOINT_LIMITS = Limits(max_file_bytes=32 * 2**30)
"""An SDXL checkpoint in fp32 is about 14 GB; every other limit is far above what SD1.5 and SDXL need
(2,500 tensors, the largest 49408 x 1280 values)."""

# Pipeline components diffusers may load from a folder, and the (library, class) each may name:
# diffusers imports the library and calls the class, so nothing else is allowed.
# Flux: CLIPTextModel + T5 (text_encoder_2); SD3.5: two CLIPTextModelWithProjection + T5 (text_encoder_3).
_TOKENIZERS = {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast"),
               ("transformers", "T5Tokenizer"), ("transformers", "T5TokenizerFast")}
_T5 = ("transformers", "T5EncoderModel")
COMPONENT_CLASSES: dict[str, set[tuple[str | None, str | None]]] = {
    "unet": {("diffusers", "UNet2DConditionModel")},
    "transformer": {("diffusers", "FluxTransformer2DModel"), ("diffusers", "SD3Transformer2DModel")},
    "vae": {("diffusers", "AutoencoderKL")},
    "text_encoder": {("transformers", "CLIPTextModel"), ("transformers", "CLIPTextModelWithProjection")},
    "text_encoder_2": {("transformers", "CLIPTextModelWithProjection"), _T5},
    "text_encoder_3": {_T5},
    "tokenizer": _TOKENIZERS,
    "tokenizer_2": _TOKENIZERS,
    "tokenizer_3": _TOKENIZERS,
    "safety_checker": {(None, None), ("stable_diffusion", "StableDiffusionSafetyChecker")},
    "feature_extractor": {(None, None), ("transformers", "CLIPImageProcessor"),
                          ("transformers", "CLIPFeatureExtractor")},
    "image_encoder": {(None, None)},
}
_SCHEDULER = re.compile(r"[A-Z][A-Za-z0-9]*Scheduler")  # any diffusers scheduler class, checked to exist
MODEL_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")

# Bounds on model config fields that set how many modules are built or how large the pipeline's
# defaults are; far above SD1.5, SDXL, Flux and SD3.5 (in brackets), far below what would exhaust a machine.
COUNT_LIMITS = {
    "layers_per_block": 16,  # [2]
    "transformer_layers_per_block": 64,  # [10]
    "num_hidden_layers": 128,  # [32, OpenCLIP bigG]
    "num_layers": 256,  # [38 SD3.5 Large joint blocks, 19 Flux double blocks, 24 T5-XXL layers]
    "num_single_layers": 256,  # [38 Flux single blocks]
    "num_decoder_layers": 256,  # [24 T5-XXL; the encoder-only model builds none]
    "block_out_channels": 8192,  # [1280]
    "sample_size": 4096,  # [128 UNet, 1024 VAE]
}
MAX_CONFIG_INT = 2**20  # any other integer in a model config [vocab_size 49408]
MAX_CONFIG_LIST = 16  # items in a model config's list [4 blocks]
MAX_SCHEDULER_INT = 100_000  # [num_train_timesteps 1000]
MAX_SCHEDULER_LIST = 100_000  # [trained_betas: one per timestep]
MAX_CONFIG_BYTES = 16 * 2**20  # any JSON or text file of a folder [tokenizer.json: 2 MB]
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# A model may need up to 1/16 more values than its weights hold: transformers initialises a tensor an
# older checkpoint lacks instead of failing. Configs that do harm ask for orders of magnitude more.
BUDGET_SLACK = 16


def _refuse(path: Path, message: str, **fields: Any) -> BaseModelError:
    return BaseModelError(message, file=path, **fields)


# --------------------------------------------------------------------------------- weight files

_scanned: dict[tuple[str, FileState], Header] = {}
_scanned_lock = threading.Lock()


def check_weights(path: str | os.PathLike) -> Header:
    """Check a weights file from header to last value (lora/safefile's ``scan_file``), hashing it on
    the same read (its content fingerprint is remembered for ``file_fingerprint``); remembered
    per file state (size, mtime, ctime, inode), so an unchanged file is read through once. As for
    file fingerprints, a state is trusted only once its last change is RACY_NS old: a same-size
    write in the same timestamp tick would leave the state as it was."""
    real = os.path.realpath(path)
    state = path_state(real)
    with _scanned_lock:
        known = _scanned.get((real, state)) if state is not None else None
    if known is not None:
        return known
    started = time.time_ns()
    # Hashed on the same read: the content fingerprint a base's identity needs is then remembered,
    # and file_fingerprint does not read the file a second time.
    header = scan_file(path, CHECKPOINT, CHECKPOINT_LIMITS, fingerprint=True)
    remember_fingerprint(real, header.digest, header.state, started)
    if started - header.state.ctime_ns >= RACY_NS:
        with _scanned_lock:
            _scanned[(real, header.state)] = header
    return header


def weights_header(path: str | os.PathLike) -> Header:
    """The checked header of a weights file (no tensor data read)."""
    return inspect_header(path, CHECKPOINT_LIMITS, CHECKPOINT)


def unchanged_since_checked(headers: Iterable[Header]) -> None:
    """Raise when a checked weights file changed after its check (so what a library read may not be
    what was checked)."""
    for header in headers:
        if path_state(header.path) != header.state:
            raise BaseModelError("this weights file changed after it was checked (another program is writing or "
                                 "replacing it).", file=header.path, kind="changed_while_reading",
                                 fix="wait until the download or copy has finished, then run again.")


# --------------------------------------------------------------------------------------- folders


def check_model_index(folder: Path) -> dict[str, tuple[str | None, str | None]]:
    """model_index.json's components, each naming only a class the supported pipelines use."""
    path = folder / "model_index.json"
    index = read_config(path, "model_index.json names the pipeline class")
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        if len(entry) != 2 or not all(part is None or isinstance(part, str) for part in entry):
            raise _refuse(path, f"component {name!r} is {entry!r}, not [library, class].", key=name, value=entry)
        pair = (entry[0], entry[1])
        allowed = COMPONENT_CLASSES.get(name)
        if name == "scheduler":
            ok = pair[0] == "diffusers" and isinstance(pair[1], str) and bool(_SCHEDULER.fullmatch(pair[1])) \
                and _diffusers_has(pair[1])
            allowed_text = "a diffusers scheduler class"
        else:
            ok = allowed is not None and pair in allowed
            allowed_text = " or ".join(f"[{a!r}, {c!r}]" for a, c in sorted(allowed, key=str)) if allowed else \
                f"no {name!r} component (the supported pipelines know {', '.join(COMPONENT_CLASSES)}, scheduler)"
        if not ok:
            raise _refuse(path, f"component {name!r} names class {list(pair)}; allowed: {allowed_text}. diffusers "
                                "imports and calls the class a folder names, so no other is loaded.",
                          key=name, value=list(pair), limit=allowed_text, kind="unknown_class",
                          fix="use a diffusers folder written by save_pretrained for SD1.5, SDXL, Flux or SD3.5")
        components[name] = pair
    return components


def _diffusers_has(name: str) -> bool:
    import diffusers

    return isinstance(getattr(diffusers, name, None), type)


def check_config_files(folder: Path, components: Iterable[str]) -> None:
    """Every JSON and text file of the listed component folders: size-capped; JSON strict."""
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            continue
        for path in sorted(sub.iterdir()):
            if path.suffix == ".json":
                read_config(path, f"{name} settings", max_bytes=MAX_CONFIG_BYTES)
            elif path.suffix == ".txt":  # merges.txt: read whole by the tokenizer, so bounded and regular
                try:
                    read_capped(path, MAX_CONFIG_BYTES, "tokenizer file")
                except FileError as exc:
                    raise _refuse(path, exc.message, value=exc.value, limit=exc.limit, kind=exc.kind) from None


def weight_files(folder: Path, component: str) -> list[Path]:
    """The weights diffusers loads for a component: its *.safetensors files without a variant infix
    (``model.fp16.safetensors`` is a variant, loaded only when asked for). Pickle-only components are
    refused: loading a pickle can run code."""
    sub = folder / component
    files = sorted(p for p in sub.glob("*.safetensors") if p.name.count(".") == 1)
    if not files:
        pickles = sorted(p.name for p in sub.iterdir() if p.suffix in _PICKLE_SUFFIXES) if sub.is_dir() else []
        if pickles:
            raise _refuse(sub / pickles[0], "only .safetensors weights are loaded: this is a pickle, and loading a "
                                            "pickle can run any code its author put in it.", value=pickles[0],
                          limit=".safetensors", kind="pickle",
                          fix="get the safetensors version of this model, or convert it with diffusers' "
                              "save_pretrained(safe_serialization=True)")
        raise _refuse(sub, f"no weights: the folder holds no {component} .safetensors file.", kind="not_found",
                      fix="point at a complete diffusers folder")
    return files


# ---------------------------------------------------------------------------------- model configs


def check_model_config(path: Path, component: str) -> dict:
    """A component's config.json, its count and size fields bounded (see COUNT_LIMITS)."""
    config = read_config(path, f"{component}/config.json describes the {component}")
    for key, value in config.items():
        limit = COUNT_LIMITS.get(key, MAX_CONFIG_INT)
        _check_numbers(path, key, value, limit, MAX_CONFIG_LIST)
    return config


def check_scheduler_config(folder: Path) -> None:
    """The scheduler's config: bounded integers and lists (num_train_timesteps sizes its tables)."""
    path = folder / "scheduler" / "scheduler_config.json"
    if path.exists():
        for key, value in read_config(path, "scheduler settings").items():
            _check_numbers(path, key, value, MAX_SCHEDULER_INT, MAX_SCHEDULER_LIST)


def _check_numbers(path: Path, key: str, value: Any, limit: int, max_items: int) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            if len(item) > max_items:
                raise _refuse(path, f"setting {key!r} lists {len(item)} items, above the limit of {max_items}.",
                              key=key, value=len(item), limit=max_items)
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > limit:
            raise _refuse(path, f"setting {key!r} is {item}, above the limit of {limit}: SD1.5 and SDXL stay far "
                                "below it, and the model it describes would not fit any machine.",
                          key=key, value=item, limit=limit)


def model_shapes(path: Path, component: str, library: str, class_name: str, config: dict) -> dict[str, tuple]:
    """The tensors (name -> shape) of the model ``config`` describes, built on the meta device: the
    library's own constructor, with no memory allocated; a tensor tied under two names once."""
    import torch

    try:
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            with torch.device("meta"):
                model = cls.from_config(config)
        else:
            import transformers

            cls = getattr(transformers, class_name)
            with torch.device("meta"):
                model = cls(cls.config_class.from_dict(config))
    except LoomError:
        raise
    except Exception as exc:  # a wrong type or value anywhere in the config: the constructor says which
        raise _refuse(path, f"this config does not describe a {class_name}: {type(exc).__name__}: "
                            f"{str(exc)[:300]}", value=type(exc).__name__, kind="bad_config") from None
    # counted once, or a valid folder of a model whose embedding is most of it is refused
    return {key: tuple(tensor.shape) for key, tensor in distinct_tensors(model).items()}


def distinct_tensors(model) -> dict:
    """``model``'s state-dict tensors under their first names only: a tied weight (T5's input
    embedding, ``shared`` and ``encoder.embed_tokens``) is one tensor under two names, which files
    save once."""
    found, seen = {}, set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            found[key] = tensor
    return found


def check_budget(config: Path, what: str, shapes: dict[str, tuple], held: Iterable[TensorInfo],
                 weights: Path) -> None:
    """The model a config describes may hold no more values than its weights (and BUDGET_SLACK):
    diffusers allocates the model first, so a config asking for more would allocate what no weights
    back. (Keys are not compared: the libraries rename old checkpoints' keys as they load them.) The
    refusal names the first tensor whose shape the weights lack."""
    held = list(held)
    needed, have = sum(math.prod(s) for s in shapes.values()), sum(info.numel for info in held)
    if needed <= have + have // BUDGET_SLACK:
        return
    spare = Counter(tuple(info.shape) for info in held)
    missing = None
    for key, shape in sorted(shapes.items(), key=lambda item: -math.prod(item[1])):
        if spare[shape]:
            spare[shape] -= 1
        elif missing is None:
            missing = f" (e.g. tensor {key!r} of shape {list(shape)}, which {weights.name} lacks)"
    raise _refuse(config, f"{what} this config describes holds {needed} values, more than the {have} its weights "
                          f"{weights} hold{missing or ''}: config and weights are of different models.",
                  value=needed, limit=have, kind="config_mismatch", fix="use the config that came with these weights")


@dataclass(frozen=True)
class CheckedFolder:
    """What ``check_folder`` found: the checked headers of the weights diffusers will load (values
    not yet scanned: ``check_weights`` does that); for a config folder, the shapes of the tensors its
    configs' models hold, by "component.key"."""

    headers: list[Header]
    shapes: dict[str, tuple]


def check_folder(folder: Path, weights: bool = True, config_only: Iterable[str] = ()) -> CheckedFolder:
    """Check a diffusers folder (or, with ``weights=False``, a config folder for a single file)
    before diffusers opens it: model_index.json, every JSON and text file, each model config against
    its weights' headers. Components in ``config_only`` (a Flux / SD3.5 single file's transformer,
    which the file brings) are checked as with ``weights=False`` while the others need weights."""
    config_only = set(config_only)
    components = check_model_index(folder)
    check_config_files(folder, components)
    check_scheduler_config(folder)
    headers, shapes_needed = [], {}
    for name in MODEL_COMPONENTS:
        if components.get(name, (None, None)) == (None, None):
            continue
        config_path = folder / name / "config.json"
        config = check_model_config(config_path, name)
        shapes = model_shapes(config_path, name, *components[name], config)
        if weights and name not in config_only:
            found = [weights_header(path) for path in weight_files(folder, name)]
            check_budget(config_path, f"the {name}", shapes,
                         (info for header in found for info in header.tensors.values()), found[0].path)
            headers += found
        else:
            shapes_needed.update({f"{name}.{key}": shape for key, shape in shapes.items()})
    return CheckedFolder(headers, shapes_needed)
