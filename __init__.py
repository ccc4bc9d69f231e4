"""LoRA Loom: combine LoRAs on diffusion models in a cached node graph.

This folder is both the Python package ``loraloom`` and a ComfyUI custom node pack. Importing it is
cheap: no torch and no model building happen at import time.
"""

from .comfy_integration import add_queue_checks, comfy_node_api, install_if_in_comfyui
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY, comfy_only_mappings, register_node
from .sweep.comfy import comfy_nodes

if install_if_in_comfyui():  # the nodes on ComfyUI's own MODEL / CLIP exist only there
    NODE_CLASS_MAPPINGS.update(comfy_only_mappings()[0])
    NODE_DISPLAY_NAME_MAPPINGS.update(comfy_only_mappings()[1])
# SweepGrid as ComfyUI runs it (it expands into its cells there: see sweep/comfy.py)
NODE_CLASS_MAPPINGS.update(comfy_nodes()[0])
NODE_DISPLAY_NAME_MAPPINGS.update(comfy_nodes()[1])
add_queue_checks(NODE_CLASS_MAPPINGS.values())  # ComfyUI runs our input checks when a prompt is queued

# Inside a ComfyUI with the V3 node API, the nodes go to it through comfy_entrypoint (made from the
# classes above: comfy_v3.py). ComfyUI takes NODE_CLASS_MAPPINGS first when it is not None, so then
# the V1 names are None here (LORALOOM_COMFY_NODES=v1|v3 forces one API). Outside ComfyUI they stay V1's.
if comfy_node_api() == "v3":
    from .comfy_v3 import comfy_entrypoint_for

    comfy_entrypoint = comfy_entrypoint_for(dict(NODE_CLASS_MAPPINGS), dict(NODE_DISPLAY_NAME_MAPPINGS))
    NODE_CLASS_MAPPINGS = NODE_DISPLAY_NAME_MAPPINGS = None

__version__ = "0.1.0"
_LAZY = {"Runtime": "api", "load_node_modules": "api", "RunResult": "graph_runtime", "node": "graph_runtime",
         "Limits": "graph_runtime"}
# The error family: each class reports its module as ``loraloom`` (what ComfyUI shows as the type),
# so each must be importable from here, also for pickling.
_ERRORS = {"graph_runtime.errors": ("LoomError", "SchemaError", "WorkflowError", "PathError", "InputError",
                                    "ValidationError", "ExecutionError", "Interrupted"),
           "atomic": ("TargetExistsError",),
           "graph_runtime.files": ("FileError",),
           "lora.errors": ("LoRAError", "LoRAFormatError", "LoRAMatchError"),
           "lora.safefile": ("LoRAFileError",), "lora.merge": ("MergeError",), "lora.blocks": ("BlockWeightError",),
           "bases.arch": ("BaseModelError",),
           "server.security": ("ServerConfigError",), "server.userdata": ("Conflict",),
           "server.store": ("DuplicateId", "StoreError"), "sweep.spec": ("SweepValidationError",)}
_LAZY.update({name: module for module, names in _ERRORS.items() for name in names})


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "Runtime", "register_node",
           "load_node_modules", "RunResult", "node", "Limits", "ValidationError", "ExecutionError"]
