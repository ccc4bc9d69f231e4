"""LoRA Loom's node classes, one file per family, and the registry the runtime and ComfyUI use.

Importing this package is cheap: node modules import torch only inside ``execute``.
"""

from __future__ import annotations

from pathlib import Path

from ..graph_runtime import NodeRegistry
from . import base, blend, checkpoint, fuse, image, lora, merge, pipeline, sample

BUILTIN = (base.LoadBase, lora.LoadLoRA, blend.WeightedBlend, merge.PeftMerge, fuse.Fuse, fuse.Compile, sample.Sample,
           lora.SaveLoRA, pipeline.SavePipeline, checkpoint.SaveCheckpoint, image.SaveImage, image.PreviewImage)
_REGISTRY = NodeRegistry(BUILTIN)

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


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _REGISTRY.comfy_mappings()
