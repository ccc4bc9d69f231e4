"""Fixtures for node tests: demo LoRA files written by our fixture generator, and a Runtime over them."""

import shutil

import pytest

from loraloom import Runtime


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory):
    """LoRA fixture files for both presets, in every format (read-only: copy before editing)."""
    from loraloom.fixtures import write_fixtures

    root = tmp_path_factory.mktemp("loras")
    paths = write_fixtures(root)
    return root, {k: p.relative_to(root).as_posix() for k, p in paths.items()}


@pytest.fixture
def loras_dir(lora_files, tmp_path):
    """A private copy of the fixture LoRA folder (tests may edit files in it)."""
    root, names = lora_files
    target = tmp_path / "loras"
    shutil.copytree(root, target)
    return target, names


@pytest.fixture
def runtime(loras_dir, tmp_path):
    root, names = loras_dir
    # demo_loras: the merge tests use the shipped demo LoRAs (rank 8 everywhere) besides the fixtures
    rt = Runtime(lora_dirs=[root], models_dir=tmp_path / "models", output_dir=tmp_path / "out", demo_loras=True)
    rt.names = names
    return rt
