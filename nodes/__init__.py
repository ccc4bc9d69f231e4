"""LoRA Loom's node classes, one file per family, and the registry the runtime and ComfyUI use.

Importing this package is cheap: node modules import torch only inside ``execute``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..graph_runtime import LoomError, NodeRegistry
from . import base, blend, checkpoint, comfy_bridge, fuse, image, lora, merge, pipeline, sample, sweep_grid

BUILTIN = (base.LoadBase, lora.LoadLoRA, blend.WeightedBlend, merge.PeftMerge, fuse.Fuse, fuse.Compile, sample.Sample,
           lora.SaveLoRA, pipeline.SavePipeline, checkpoint.SaveCheckpoint, image.SaveImage, image.PreviewImage,
           sweep_grid.SweepGrid)
_REGISTRY = NodeRegistry(BUILTIN)
COMFY_ONLY = (comfy_bridge.ApplyLoRA,)
"""Nodes on ComfyUI's own values (MODEL, CLIP): listed in ComfyUI's mappings only (see `comfy_only_mappings`)."""

ENV_NODE_MODULES = "LORALOOM_NODE_MODULES"

WEB_DIRECTORY = "./web"
"""The nodes' editor extension (it shows each node's ``ui`` text on the node), relative to the pack
folder: ComfyUI reads it from the pack's ``__init__`` and serves its files under ``/extensions/<pack>/``."""
WEB_DIR = Path(__file__).resolve().parents[1] / WEB_DIRECTORY


def register_node(cls: type) -> type:
    """Register a node class (declared with ``@node``) for every new Runtime. Usable as a decorator."""
    return _REGISTRY.register(cls)


def registry() -> NodeRegistry:
    """The registry of built-in and user-registered nodes."""
    return _REGISTRY


def load_node_modules(names=None) -> list[str]:
    """Import user modules that register nodes (``register_node``); names from the argument or from
    ``LORALOOM_NODE_MODULES`` (comma-separated). Returns the modules imported."""
    if names is None:
        names = [n.strip() for n in os.environ.get(ENV_NODE_MODULES, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            # the module (or a package above it) is not there, or it is and something it imports is not
            missing = exc.name is not None and (name == exc.name or name.startswith(exc.name + "."))
            raise LoomError(f"node module {name!r} could not be imported: {exc}.", key=name, value=name,
                            kind="node_module_missing" if missing else "node_module_failed",
                            fix="check the name and that it is on PYTHONPATH" if missing
                            else "install what it needs") from exc
    return list(names)


def comfy_only_mappings() -> tuple[dict, dict]:
    """``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS`` entries of the comfy-only nodes, which
    the pack adds when it is loaded by ComfyUI (never outside: nothing there makes a MODEL or CLIP)."""
    return NodeRegistry(COMFY_ONLY, comfy=True).comfy_mappings()


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _REGISTRY.comfy_mappings()
