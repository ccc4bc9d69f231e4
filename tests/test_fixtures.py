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


def test_dit_fixtures_are_deterministic(dit_files, tmp_path):
    # `loraloom fixtures` builds the presets itself: the same bytes as the suite's files, every format
    again = write_fixtures(tmp_path, presets=("tiny-flux", "tiny-sd3"))
    assert set(again) == {f"tiny-flux/{fmt}" for fmt in ("diffusers", "kohya", "comfyui", "xlabs", "loha", "lokr")} | {
        f"tiny-sd3/{fmt}" for fmt in ("diffusers", "kohya", "comfyui")}
    for name, path in again.items():
        assert path.read_bytes() == dit_files[name].read_bytes(), f"{name} differs between two runs"


def test_cli_writes_the_dit_presets(tmp_path, capsys):
    from loraloom.fixtures import PRESETS, main

    assert main([str(tmp_path), "--preset", "tiny-flux", "--preset", "tiny-sd3"]) == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert {"tiny-flux/xlabs", "tiny-flux/lokr", "tiny-sd3/comfyui"} <= set(printed)
    assert set(PRESETS) == {"tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3"}


def test_dit_fixtures_at_a_chosen_rank_in_every_block(flux, tmp_path):
    # The benchmarks' real-size files: every block of the transformer, one rank everywhere; read back
    # through the readers (fused qkv / linear1 split) onto diffusers' modules.
    from loraloom.fixtures import write_dit_fixtures
    from loraloom.lora.match import base_spec, check_lora
    from loraloom.lora.readers import read_lora

    spec = base_spec({"transformer": flux})
    files = write_dit_fixtures(tmp_path, spec, "flux", "big", rank=16, every_block=True)
    for fmt in ("diffusers", "kohya", "comfyui", "xlabs"):
        lora = read_lora(files[f"big/{fmt}"])
        check_lora(lora, spec)
        paths = lora.components["transformer"]
        blocks = {p.split(".")[1] for p in paths if p.startswith("transformer_blocks.")}
        singles = {p.split(".")[1] for p in paths if p.startswith("single_transformer_blocks.")}
        assert (len(blocks), len(singles)) == (19, 38), fmt
        assert {m.down.shape[0] for m in paths.values()} == {16}, fmt
    default = write_dit_fixtures(tmp_path / "default", spec, "flux", "small")
    paths = read_lora(default["small/comfyui"]).components["transformer"]
    assert {p.split(".")[1] for p in paths if p.startswith("single_transformer_blocks.")} == {"0", "1", "10", "37"}
