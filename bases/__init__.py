"""Base models: built-in tiny presets, offline loading (diffusers folder, single-file checkpoint with
a config folder), architecture detection, dtype/device parsing, writers for the loadable forms
(`export`: diffusers folder, original-layout single file) and `apply_lora`, which loads a LoRA value
into a live diffusers pipeline as a peft adapter.

Importing this package (or `bases.presets`, `bases.arch`) imports no torch: the names below load
their module on first use, so listing the presets (what `loraloom validate` does) stays cheap.
diffusers and transformers are imported only when a pipeline is built or loaded.
"""
import importlib

_LAZY = {
    "apply_lora": "adapters",
    "ARCHES": "arch", "detect_checkpoint_arch": "arch", "detect_file_arch": "arch", "detect_folder_arch": "arch",
    "detect_pipeline_arch": "arch",
    "resolve": "devices", "resolve_device": "devices", "resolve_dtype": "devices",
    "LoadedBase": "loading", "load_base": "loading",
    "PRESETS": "presets", "build_pipeline": "presets",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
