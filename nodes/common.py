"""Helpers shared by the node families: socket types, the model pool, folder listings, atomic saves."""

from __future__ import annotations

from pathlib import Path

from ..graph_runtime import TEMP_SUBFOLDER, Float, PathError, check_relative_name, current_context

# Our own socket types (never ComfyUI's MODEL, CLIP or LORA: their values are other objects).
MODEL = "MODEL_RECIPE"
LORA = "LORA_WEIGHTS"
IMAGE = "IMAGE"  # ComfyUI's convention on purpose: float32 [B, H, W, C] in 0..1
CATEGORY = "LoRA Loom"
LORA_SUFFIXES = (".safetensors",)
# The one bound on every LoRA weight and scale a node takes (WeightedBlend and PeftMerge weights,
# Fuse's and Sample's lora_scale), both signs. 10 was PeftMerge's bound and is wider than the blend
# nodes' old 4, so no saved workflow falls outside it; far beyond a few x a LoRA's delta dwarfs the
# base weights it was trained against, so a larger value is a typo far more often than intent.
# (Per-block multipliers inside a block_weights string are another quantity, bounded by
# lora.blocks.MAX_ABS_WEIGHT, Inspire Pack's own bound.)
MAX_WEIGHT = 10.0


def weight_input(name: str, tooltip: str = "", optional: bool = False):
    """A LoRA weight or scale widget: default 1.0, within +-MAX_WEIGHT, negative allowed."""
    return Float(name, 1.0, min=-MAX_WEIGHT, max=MAX_WEIGHT, step=0.05, tooltip=tooltip, optional=optional)


def model_pool():
    """The model pool of the running Runtime (or the process-wide one outside a Runtime)."""
    from ..bases.pool import pool_from

    return pool_from(current_context().resources)


def folders():
    return current_context().folders


def list_loras() -> list[str]:
    """LoRA files in the configured LoRA folders (what LoadLoRA's COMBO offers)."""
    return folders().list("loras", LORA_SUFFIXES)


def list_bases() -> list[str]:
    """Built-in presets, then diffusers folders (anywhere under the models folder) and single-file
    checkpoints (under its ``checkpoints/`` subfolder, ComfyUI's layout)."""
    from ..bases.presets import PRESETS

    singles = [n for n in folders().list("models", (".safetensors",)) if n.startswith("checkpoints/")]
    return list(PRESETS) + _diffusers_folders() + singles


def _diffusers_folders() -> list[str]:
    f = folders()
    return [n for n in f.list("models", dirs=True) if (f.models_dir / n / "model_index.json").is_file()]


def list_config_folders() -> list[str]:
    """"auto" plus the diffusers folders / config skeletons under the models folder."""
    return ["auto"] + _diffusers_folders()


def check_prefix(constants: dict, name: str = "filename_prefix") -> dict:
    """Validation-time check that an output name stays inside the output folder."""
    try:
        check_relative_name(constants.get(name, ""), "output", folders().advice)
    except PathError as exc:
        return {name: exc}
    return {}


def unique_output(prefix: str, suffix: str = "") -> Path:
    """A new path ``<prefix>_00001_<suffix>`` (a file) or ``<prefix>_00001`` (a folder: no `suffix`)
    under the output folder, ComfyUI's numbering: never an existing name, never outside the output
    root. Every node that writes an output names it here."""
    f = folders()
    n = 1
    while True:
        path = f.output_path(f"{prefix}_{n:05d}" + (f"_{suffix}" if suffix else ""))
        if not path.exists():
            return path
        n += 1


def output_ref(path: Path, kind: str = "output") -> dict:
    """ComfyUI's reference to a saved file: ``{"filename", "subfolder", "type"}``; a ``temp`` file's
    subfolder is relative to the temp folder, as ComfyUI's ``/view?type=temp`` expects."""
    root = folders().output_dir.resolve()
    rel = Path(path).relative_to(root / TEMP_SUBFOLDER if kind == "temp" else root)
    return {"filename": rel.name, "subfolder": "" if rel.parent == Path(".") else rel.parent.as_posix(),
            "type": kind}
