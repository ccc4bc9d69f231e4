"""Fixtures for the LoRA tests: the base specs of both presets (the fixture LoRA files and sampling
helpers are in tests/conftest.py, shared with tests/bases)."""
from __future__ import annotations

import pytest

from loraloom.fixtures import PRESETS  # one seeded preset per architecture: the fixture LoRAs' bases
from loraloom.lora.match import base_spec



@pytest.fixture(scope="session")
def specs():
    """{preset: BaseSpec} of both tiny presets; read-only."""
    from loraloom.bases.presets import build_pipeline

    return {p: base_spec(build_pipeline(p, dtype="fp32", device="cpu")) for p in PRESETS}

