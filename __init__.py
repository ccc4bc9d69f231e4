"""LoRA Loom: combine LoRAs on diffusion models in a cached node graph.

This folder is both the Python package ``loraloom`` and a ComfyUI custom node pack. Importing it is
cheap: no torch and no model building happen at import time.
"""

from .comfy_integration import install_if_in_comfyui
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_node

install_if_in_comfyui()

__version__ = "0.1.0"
_LAZY = {"Runtime": "api", "load_node_modules": "api", "RunResult": "graph_runtime",
         "ValidationError": "graph_runtime", "ExecutionError": "graph_runtime", "node": "graph_runtime"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "Runtime", "register_node", *_LAZY]
