"""The Python API: a Runtime that knows LoRA Loom's nodes and the user's own."""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

from . import graph_runtime
from .nodes import register_node, registry

ENV_NODE_MODULES = "LORALOOM_NODE_MODULES"
DEMO_LORA_DIR = Path(__file__).resolve().parent / "workflows" / "loras"


def load_node_modules(names=None) -> list[str]:
    """Import user modules that register nodes (``register_node``); names from the argument or from
    ``LORALOOM_NODE_MODULES`` (comma-separated). Returns the modules imported."""
    if names is None:
        names = [n.strip() for n in os.environ.get(ENV_NODE_MODULES, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise graph_runtime.LoomError(f"node module {name!r} could not be imported: {exc}. "
                                          f"Fix: check the name and that it is on PYTHONPATH") from exc
    return list(names)


class Runtime(graph_runtime.Runtime):
    """A :class:`graph_runtime.Runtime` whose registry holds LoRA Loom's nodes plus registered ones.

    >>> rt = Runtime(lora_dirs=["loras"], output_dir="out")
    >>> result = rt.run("workflows/blend.json", overrides={"4.weight": 0.8})
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("registry", registry())
        super().__init__(**kwargs)
        # The shipped workflows' demo LoRAs are found after the user's own folders.
        if DEMO_LORA_DIR.is_dir() and DEMO_LORA_DIR not in self.folders.lora_dirs:
            # a new Folders: one the caller passed in is theirs, not ours to change
            self.folders = dataclasses.replace(self.folders, lora_dirs=[*self.folders.lora_dirs, DEMO_LORA_DIR])


__all__ = ["Runtime", "load_node_modules", "register_node"]
