"""Shared tiny-model fixtures for the whole test suite.

Tests mutate pipelines (load_lora_weights, set_adapters, fuse_lora), so the pipeline fixtures are
function-scoped factories that build a fresh pipeline per call (0.05-0.15 s). Session-scoped
fixtures below hand out files only: treat those folders as read-only.
"""
from __future__ import annotations

import pytest

from loraloom.models import presets

PRESET_NAMES = tuple(presets.PRESETS)


@pytest.fixture
def tiny_pipeline():
    """Factory: `tiny_pipeline("tiny-sd15" | "tiny-sdxl", dtype="fp32", device="cpu")` -> a fresh
    diffusers pipeline, bit-identical on every call and independent of the global RNG."""

    def build(name: str = "tiny-sd15", dtype: str = "fp32", device: str = "cpu"):
        return presets.build_pipeline(name, dtype=dtype, device=device)

    return build


@pytest.fixture
def tiny_sd15(tiny_pipeline):
    """A fresh tiny-sd15 StableDiffusionPipeline (fp32, cpu)."""
    return tiny_pipeline("tiny-sd15")


@pytest.fixture
def tiny_sdxl(tiny_pipeline):
    """A fresh tiny-sdxl StableDiffusionXLPipeline (fp32, cpu)."""
    return tiny_pipeline("tiny-sdxl")


@pytest.fixture(params=PRESET_NAMES)
def tiny_any(request, tiny_pipeline):
    """A fresh tiny pipeline of each preset in turn; `request.param` is the preset name."""
    return tiny_pipeline(request.param)
