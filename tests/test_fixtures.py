"""fixtures.py: the generated fixture LoRAs are the same bytes on every run."""
from __future__ import annotations

from loraloom.fixtures import write_fixtures


def test_fixtures_are_deterministic(lora_files, tmp_path):
    again = write_fixtures(tmp_path, presets=("tiny-sd15",))
    for name, path in again.items():
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        originals = sorted(lora_files[name].iterdir()) if path.is_dir() else [lora_files[name]]
        for new, old in zip(files, originals):
            assert new.read_bytes() == old.read_bytes(), f"{name}: {new.name} differs between two runs"
