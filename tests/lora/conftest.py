"""Fixtures for the LoRA format tests: the fixture files (written once per session) and helpers
that sample a pipeline and build hand-merged references."""
from __future__ import annotations

import warnings

import pytest
import torch

from loraloom.lora.canonical import delta
from loraloom.fixtures import write_fixtures
from loraloom.lora.match import base_spec


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory):
    """{"<preset>/<format>": path} of every fixture LoRA; read-only."""
    return write_fixtures(tmp_path_factory.mktemp("lora-fixtures"))


@pytest.fixture(scope="session", autouse=True)
def _quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="peft")
        yield
    diffusers_logging.set_verbosity(level)


@pytest.fixture(scope="session")
def sample():
    """sample(pipe) -> latents after 2 Euler steps at 64 px, fixed prompt and seed (no CFG)."""

    def run(pipe) -> torch.Tensor:
        with torch.no_grad():
            return pipe(
                prompt="a photo of a cat",
                num_inference_steps=2,
                guidance_scale=1.0,
                height=64,
                width=64,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            ).images

    return run


@pytest.fixture(scope="session")
def hand_merge():
    """hand_merge(pipe, lora) adds W += delta(module) to every targeted weight of `pipe`, in place."""

    def merge(pipe, lora):
        spec = base_spec(pipe)
        with torch.no_grad():
            for component, path, module in lora.modules():
                layer = getattr(pipe, component).get_submodule(spec.model_name(component, path))
                layer.weight += delta(module, tuple(layer.weight.shape)).to(layer.weight.dtype)
        return pipe

    return merge


@pytest.fixture(scope="session")
def base_sample(sample):
    """base_sample(preset) -> sample() of the untouched preset, computed once per session."""
    from loraloom.bases.presets import build_pipeline

    cache: dict[str, torch.Tensor] = {}

    def get(preset: str) -> torch.Tensor:
        if preset not in cache:
            cache[preset] = sample(build_pipeline(preset, dtype="fp32", device="cpu"))
        return cache[preset]

    return get
