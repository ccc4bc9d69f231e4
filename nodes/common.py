"""Helpers shared by the node families: socket types, the model pool, folder listings, atomic saves,
ComfyUI's filename_prefix variables."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..atomic import NewOutput, atomic_new, remove_stale_temps
from ..graph_runtime import Float, PathError, String, check_relative_name, current_context

# Our own socket types (never ComfyUI's MODEL, CLIP or LORA: their values are other objects).
MODEL = "MODEL_RECIPE"
LORA = "LORA_WEIGHTS"
IMAGE = "IMAGE"  # ComfyUI's convention on purpose: float32 [B, H, W, C] in 0..1
CATEGORY = "LoRA Loom"  # web/loraloom.js finds our nodes by it
LORA_SUFFIXES = (".safetensors",)
# The one bound on every LoRA weight and scale a node takes (WeightedBlend and PeftMerge weights,
# Fuse's and Sample's lora_scale), both signs. 10 was PeftMerge's bound and is wider than the blend
# nodes' old 4, so no saved workflow falls outside it; far beyond a few x a LoRA's delta dwarfs the
# base weights it was trained against, so a larger value is a typo far more often than intent.
# (Per-block multipliers inside a block_weights string are another quantity, bounded by
# lora.blocks.MAX_ABS_WEIGHT, Inspire Pack's own bound.)
MAX_WEIGHT = 10.0


def same_base(cls, constants: dict, upstream: dict) -> dict | None:
    """``output_facts`` of a node whose MODEL output is its ``model`` input with LoRAs applied, fused
    or compiled: the same base, so what validation knows of it (its architecture) carries on."""
    return upstream.get("model")


def weight_input(name: str, tooltip: str = "", optional: bool = False):
    """A LoRA weight or scale widget: default 1.0, within +-MAX_WEIGHT, negative allowed."""
    return Float(name, 1.0, min=-MAX_WEIGHT, max=MAX_WEIGHT, step=0.05, tooltip=tooltip, optional=optional)


def block_weights_input():
    """The ``block_weights`` widget of every node that applies a LoRA (WeightedBlend, ApplyLoRA): one
    notation, read by `lora.blocks`."""
    return String("block_weights", "", tooltip="per-block weights: an A1111 lora-block-weight string "
                  "(e.g. 1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1 on SD1.5; on Flux base + 19 double + 38 single = 58 "
                  "values, on SD3.5 base + 38 joint = 39) or preset (e.g. OUTALL on SD1.5, SDXL-OUTALL "
                  "on SDXL, FLUX-DBL-ALL on Flux, SD3-FRONT on SD3.5), or a diffusers dict as JSON "
                  "({\"unet\": {\"down\": 0, \"up\": 1}}, or on a DiT {\"transformer\": "
                  "{\"single_transformer_blocks\": 0}}); applies to every layer of a block, resnets included")


def model_pool():
    """The model pool of the running Runtime (or the process-wide one outside a Runtime)."""
    from ..bases.pool import pool_from

    return pool_from(current_context().resources)


def folders():
    return current_context().folders


def list_loras() -> list[str]:
    """LoRA files in the configured LoRA folders, then those saved into the output folder's ``loras/``
    (SaveLoRA's default), as ``loras/<name> [output]`` (what LoadLoRA's COMBO offers)."""
    return folders().list("loras", LORA_SUFFIXES)


def lora_source_name(lora) -> str | None:
    """The name of the file ``lora`` was read from relative to the LoRA folder it lies in (what
    LoadLoRA's list shows), for provenance a merge can share: never an absolute path. None for a
    LoRA made in the graph (no file)."""
    if not lora.path:
        return None
    return folders().lora_name(lora.path) or Path(lora.path).name


CHECKPOINT_SUFFIXES = (".safetensors",)  # pickles (.ckpt, .pt) can run code: never offered


def list_bases() -> list[str]:
    """Built-in presets, then diffusers folders (anywhere under the models folder), then single-file
    checkpoints: inside ComfyUI those of its ``checkpoints`` folders (extra_model_paths.yaml's too),
    named as its own checkpoint loader lists them (relative to their folder); elsewhere those under
    the models folder's ``checkpoints/`` subfolder (ComfyUI's layout), named by their path there.
    The three never share a name: presets have no suffix, folders named like a checkpoint file are
    not offered, and file names end in ".safetensors"."""
    from ..bases.presets import PRESETS

    f = folders()
    if f.checkpoint_dirs:
        singles = f.list("checkpoints", CHECKPOINT_SUFFIXES)
    else:
        singles = [n for n in f.list("models", CHECKPOINT_SUFFIXES) if n.startswith("checkpoints/")]
    return list(PRESETS) + [n for n in _diffusers_folders() if not n.lower().endswith(CHECKPOINT_SUFFIXES)] + singles


def find_base(source: str, f=None) -> Path:
    """The file or folder of a LoadBase ``source`` that is not a preset (see `list_bases`): a
    checkpoint name in ComfyUI's checkpoints folders (the first that holds it, as ComfyUI resolves
    it), else a path under the models folder. Never outside those roots. ``f``: the Folders (default:
    the running context's)."""
    f = f or folders()
    if f.checkpoint_dirs and isinstance(source, str) and source.lower().endswith(CHECKPOINT_SUFFIXES):
        return f.find("checkpoints", source)
    return f.find("models", source)


def tokenizer_dirs(f=None) -> list[Path]:
    """Where a checkpoint's config "auto" looks for the CLIP tokenizer files, in order: the models
    folder's ``tokenizers/clip/``, then the runtime's own (ComfyUI's, inside ComfyUI). ``f``: the
    Folders (default: the running context's)."""
    from ..bases.auto_config import TOKENIZER_FOLDER

    f = f or folders()
    return [f.models_dir / TOKENIZER_FOLDER, *f.tokenizer_dirs]


PART_FOLDERS = {"text_encoders": ("text_encoders", "clip"), "vae": ("vae",)}
"""Under the models folder, where config "auto" looks for a Flux / SD3.5 file's other parts by kind
(ComfyUI's layout: models/clip is the older name of models/text_encoders)."""


def part_dirs(f=None) -> dict[str, list[Path]]:
    """Where a Flux / SD3.5 file's config "auto" looks for its text encoders, VAE and T5 tokenizer
    (bases.dit_parts), by kind, in order: the models folder's (see ``PART_FOLDERS``, and
    ``tokenizers/t5``), then the runtime's own (ComfyUI's folders, inside ComfyUI). ``f``: the
    Folders (default: the running context's)."""
    from ..bases.auto_config import T5_TOKENIZER_FOLDER
    from ..bases.dit_parts import T5_TOKENIZER

    f = f or folders()
    found = {kind: [f.models_dir / name for name in names] for kind, names in PART_FOLDERS.items()}
    found[T5_TOKENIZER] = [f.models_dir / T5_TOKENIZER_FOLDER]
    for kind, dirs in f.part_dirs.items():
        found.setdefault(kind, []).extend(d for d in dirs if d not in found[kind])
    return found


def _diffusers_folders() -> list[str]:
    f = folders()
    return [n for n in f.list("models", dirs=True) if (f.models_dir / n / "model_index.json").is_file()]


def list_config_folders() -> list[str]:
    """"auto" plus the diffusers folders / config skeletons under the models folder."""
    return ["auto"] + _diffusers_folders()


def check_prefix(constants: dict, name: str = "filename_prefix") -> dict:
    """Validation-time check that an output name stays inside the output folder (absent: nothing to check)."""
    if name not in constants:
        return {}
    try:
        check_relative_name(constants[name], "output", fix=folders().advice.outside["output"])
    except PathError as exc:
        return {name: exc}
    return {}


@contextlib.contextmanager
def new_output(prefix: str, suffix: str = "", *, folder: bool = False, root: Path | None = None
               ) -> Iterator[NewOutput]:
    """``with new_output(prefix, ".png") as new: write(new.stage)``; then ``new.path`` is the saved
    ``<prefix>_00001_<suffix>`` (a file) or ``<prefix>_00001`` (``folder=True``, no suffix) under the
    output folder, ComfyUI's numbering. The name is taken only when the output is complete, in one
    step that never replaces anything: concurrent saves into one folder each get their own number
    (see `atomic.atomic_new`). ``prefix`` is checked again here, after `expand_prefix`: never
    outside the output root (or ``root``, where one is given). Every node that writes an output
    saves it here."""
    f = folders()
    first = check_relative_name(_numbered(prefix, 1, suffix), "output", fix=f.advice.outside["output"])
    parent = f.output_path(str(first.parent), root)

    def name_for(n: int) -> Path:
        return parent / PurePosixPath(_numbered(prefix, n, suffix)).name

    with atomic_new(name_for, folder=folder) as new:
        yield new


def _numbered(prefix: str, n: int, suffix: str) -> str:
    return f"{prefix}_{n:05d}" + (f"_{suffix}" if suffix else "")


_CLEANED: set[Path] = set()


def remove_stale_saves(folders) -> list[Path]:
    """Delete the temp files and folders that saves killed mid-write (kill -9, power loss) left in the
    output folder; called when a Runtime starts. See `atomic.remove_stale_temps`. The walk covers the
    whole output folder, so it runs once per folder and process: a program that makes many Runtimes
    on one folder pays for it once."""
    root = folders.output_dir
    if not root.is_dir() or root.resolve() in _CLEANED:
        return []
    _CLEANED.add(root.resolve())
    return remove_stale_temps(root)


# ComfyUI's filename_prefix variables. Its editor replaces "%date:FORMAT%" and "%Node.widget%" when a
# prompt is queued (the frontend's applyTextReplacements); its SaveImage then replaces %width%,
# %height%, %year%, %month%, %day%, %hour%, %minute%, %second% (folder_paths.get_save_image_path, with
# width = height = 0 for saves of other things) and %batch_num% in the file name. Headless, nobody
# ran the editor's step, so both happen here, in that order.
_VARIABLE = re.compile(r"%([^%]+)%")
_DATE_FIELD = re.compile(r"dd?|MM?|hh?|mm?|ss?|yyy?y?")  # the editor's date fields; "yyy" stays as is


def expand_prefix(prefix: str, *, width: int = 0, height: int = 0, now: time.struct_time | None = None) -> str:
    """``prefix`` with ComfyUI's variables replaced: ``%date:yyyy-MM-dd%`` (fields yyyy, yy, MM, M,
    dd, d, hh, h, mm, m, ss, s; hours 0-23), ``%Title.widget%`` (the node found by its "Node name for
    S&R" property, which defaults to its class type, then by title, then, ours only, by id; "/" and
    "\\" in the value become "_"), ``%width%``, ``%height%``, ``%year%``, ``%month%``, ``%day%``,
    ``%hour%``, ``%minute%``, ``%second%`` (local time, two digits). Anything else between ``%`` stays
    as written, as in ComfyUI."""
    now = now or time.localtime()
    ctx = current_context()

    def editor(match: re.Match) -> str:
        parts = match.group(1).split(".")
        if len(parts) != 2:
            # the editor formats only the text before a first '.': "%date:yyyy.MM.dd%" is the year
            return _format_date(parts[0][5:], now) if parts[0].startswith("date:") else match.group(0)
        value = _widget_value(ctx.prompt or {}, ctx.workflow, *parts)
        return match.group(0) if value is None else re.sub(r"[/\\]", "_", value)

    prefix = _VARIABLE.sub(editor, prefix)
    values = {"width": f"{width}", "height": f"{height}", "year": f"{now.tm_year}", "month": f"{now.tm_mon:02d}",
              "day": f"{now.tm_mday:02d}", "hour": f"{now.tm_hour:02d}", "minute": f"{now.tm_min:02d}",
              "second": f"{now.tm_sec:02d}"}
    for name, value in values.items():  # one after another, as ComfyUI does
        prefix = prefix.replace(f"%{name}%", value)
    return prefix


def _format_date(fmt: str, now: time.struct_time) -> str:
    fields = {"d": now.tm_mday, "M": now.tm_mon, "h": now.tm_hour, "m": now.tm_min, "s": now.tm_sec}

    def field(match: re.Match) -> str:
        text = match.group(0)
        if text == "yy":
            return str(now.tm_year)[2:]
        if text == "yyyy":
            return str(now.tm_year)
        if text[0] in fields:
            return str(fields[text[0]]).zfill(len(text))
        return text

    return _DATE_FIELD.sub(field, fmt)


def _widget_value(prompt: dict, workflow: dict | None, node_name: str, widget: str) -> str | None:
    """The widget's value as the editor prints it, or None (no such node or widget, or a link)."""
    ui_nodes = {str(n.get("id")): n for n in (workflow or {}).get("nodes", []) if isinstance(n, dict)}

    def search_name(nid: str, entry: dict) -> str | None:
        props = ui_nodes.get(nid, {}).get("properties")
        name = props.get("Node name for S&R") if isinstance(props, dict) else None
        return name if isinstance(name, str) else entry.get("class_type")

    def title(nid: str, entry: dict) -> str | None:
        meta = entry.get("_meta")
        return meta.get("title") if isinstance(meta, dict) else ui_nodes.get(nid, {}).get("title")

    entries = [(str(nid), e) for nid, e in prompt.items() if isinstance(e, dict)]
    for matches in (lambda nid, e: search_name(nid, e) == node_name, lambda nid, e: title(nid, e) == node_name,
                    lambda nid, e: nid == node_name):
        found = [e for nid, e in entries if matches(nid, e)]
        if found:  # the editor takes the first match
            inputs = found[0].get("inputs")
            if not isinstance(inputs, dict) or widget not in inputs or isinstance(inputs[widget], list):
                return None
            return _as_editor_text(inputs[widget])
    return None


def _as_editor_text(value) -> str:
    # JavaScript's String(value): true, 5 (not 5.0), "" for null
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def output_ref(path: Path, kind: str = "output") -> dict:
    """ComfyUI's reference to a saved file: ``{"filename", "subfolder", "type"}``; a ``temp`` file's
    subfolder is relative to the temp folder, as ComfyUI's ``/view?type=temp`` expects."""
    rel = Path(path).relative_to(folders().ref_root(kind))
    return {"filename": rel.name, "subfolder": "" if rel.parent == Path(".") else rel.parent.as_posix(),
            "type": kind}
