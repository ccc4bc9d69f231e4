"""Base models: built-in tiny presets, offline loading (diffusers folder, single-file checkpoint with
a config folder), architecture detection, dtype/device parsing, writers for the loadable forms
(`export`: diffusers folder, original-layout single file) and `apply_lora`, which loads a LoRA value
into a live diffusers pipeline as a peft adapter.

diffusers and transformers are imported only when a pipeline is built or loaded.
"""
from .adapters import apply_lora
from .arch import ARCHES, detect_checkpoint_arch, detect_file_arch, detect_folder_arch, detect_pipeline_arch
from .devices import resolve, resolve_device, resolve_dtype
from .loading import LoadedBase, load_base
from .presets import PRESETS, build_pipeline

__all__ = [
    "ARCHES",
    "PRESETS",
    "apply_lora",
    "LoadedBase",
    "build_pipeline",
    "detect_checkpoint_arch",
    "detect_file_arch",
    "detect_folder_arch",
    "detect_pipeline_arch",
    "load_base",
    "resolve",
    "resolve_device",
    "resolve_dtype",
]
