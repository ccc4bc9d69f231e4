"""The LoRA domain: read any supported file into one canonical LoRA value, check it against a
base, write it back out (kohya / diffusers), convert LyCORIS modules to LoRA; plus merge maths and block
maps. No diffusers pipelines here: `bases.apply_lora` loads a LoRA into one.

Importing this package is cheap: names below are loaded on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    # canonical value
    "LoRA": "canonical",
    "LoRAModule": "canonical",
    "LoHaModule": "canonical",
    "LoKrModule": "canonical",
    "COMPONENTS": "canonical",
    "delta": "canonical",
    "derived_fingerprint": "canonical",
    "state_dict_fingerprint": "canonical",
    # errors
    "LoRAError": "errors",
    "LoRAFormatError": "errors",
    "LoRAMatchError": "errors",
    # read / write
    "FORMATS": "readers",
    "read_lora": "readers",
    "lora_from_state_dict": "readers",
    "detect_format": "readers",
    "write_kohya": "writers",
    "write_diffusers": "writers",
    "to_original_state_dict": "writers",
    "atomic_save": "writers",
    # against a base
    "BaseSpec": "match",
    "MatchReport": "match",
    "base_spec": "match",
    "match_lora": "match",
    "check_lora": "match",
    "guess_architecture": "match",
    "as_lora": "convert",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
