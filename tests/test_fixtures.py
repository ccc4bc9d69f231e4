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


def test_dit_fixtures_are_deterministic(dit_files, flux, text_encoders, tmp_path):
    from loraloom.fixtures import write_dit_fixtures
    from loraloom.lora.match import base_spec

    clip, t5 = text_encoders
    again = write_dit_fixtures(tmp_path, base_spec({"transformer": flux, "text_encoder": clip, "text_encoder_2": t5}),
                               "flux", "tiny-flux")  # fmt: skip
    assert set(again) == {f"tiny-flux/{fmt}" for fmt in ("diffusers", "kohya", "comfyui", "xlabs", "loha", "lokr")}
    for name, path in again.items():
        assert path.read_bytes() == dit_files[name].read_bytes(), f"{name} differs between two runs"
