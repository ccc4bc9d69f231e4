"""The disk cache from the command line: a second `loraloom run` process of a merge workflow merges
nothing; `--disk-cache-dir`, `--disk-cache-bytes`, `--no-disk-cache` and their variables; a damaged
entry is a note and a recomputed merge; `loraloom cache info|clear`."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraloom.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "workflows" / "loras"
MERGE = {
    "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": "demo-a.safetensors"}},
    "3": {"class_type": "LoadLoRA", "inputs": {"lora_name": "demo-b.safetensors"}},
    "4": {"class_type": "PeftMerge", "inputs": {"lora_a": ["2", 0], "weight_a": 1.0, "lora_b": ["3", 0], "weight_b": 1.0,
                                                "method": "svd", "density": 0.5, "majority_sign_method": "total",
                                                "svd_rank": 4, "svd_clamp": 0.0, "seed": 0}},
    "5": {"class_type": "SaveLoRA", "inputs": {"lora": ["4", 0], "filename_prefix": "loras/merged", "format": "kohya",
                                               "dtype": "fp32"}},
}


def workflow(tmp_path) -> Path:
    path = tmp_path / "merge.json"
    path.write_text(json.dumps(MERGE))
    return path


def cli_process(tmp_path, *flags, env=None):
    """``loraloom run`` of the merge workflow in a new process; stderr is a file (plain log lines)."""
    return subprocess.run([sys.executable, "-m", "loraloom.cli", "run", str(workflow(tmp_path)), "--lora-dir", str(DEMO),
                           "--output-dir", str(tmp_path / "out"), *flags], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("??/*.safetensors"))


def test_a_second_process_merges_nothing_and_saves_the_same_lora(tmp_path):
    disk = tmp_path / "disk"
    first = cli_process(tmp_path, "--disk-cache-dir", str(disk), "--disk-cache-bytes", "1_000_000_000")
    assert first.returncode == 0, first.stderr
    assert "node 4 (PeftMerge) done" in first.stderr and "cached (disk)" not in first.stderr
    assert len(entries(disk)) == 1
    # the second process finds the folder and budget in the environment
    second = cli_process(tmp_path, env={"LORALOOM_DISK_CACHE_DIR": str(disk), "LORALOOM_DISK_CACHE_BYTES": "1000000000"})
    assert second.returncode == 0, second.stderr
    assert "cached (disk): node 4" in second.stderr.splitlines()
    assert "PeftMerge" not in second.stderr and "LoadLoRA" not in second.stderr, "no merge, no LoRA read"
    assert "done: 1 executed, 1 cached (1 from disk)" in second.stdout
    saved = sorted((tmp_path / "out" / "loras").glob("merged_*.safetensors"))
    assert len(saved) == 2 and saved[0].read_bytes() == saved[1].read_bytes(), "the same merged LoRA, byte for byte"


def test_no_disk_cache_and_budget_zero_write_nothing(tmp_path, monkeypatch, capsys):
    disk = tmp_path / "disk"
    monkeypatch.setenv("LORALOOM_DISK_CACHE_BYTES", "1000000000")
    for flags in (["--no-disk-cache"], ["--disk-cache-bytes", "0"]):
        assert main(["run", str(workflow(tmp_path)), "--lora-dir", str(DEMO), "--output-dir", str(tmp_path / "out"),
                     "--disk-cache-dir", str(disk), *flags]) == 0
        assert "node 4 (PeftMerge) done" in capsys.readouterr().err
    assert not disk.exists()


def test_a_damaged_entry_is_a_note_and_the_merge_runs_again(tmp_path, monkeypatch, capsys):
    disk = tmp_path / "disk"
    monkeypatch.setenv("LORALOOM_DISK_CACHE_BYTES", "1000000000")
    argv = ["run", str(workflow(tmp_path)), "--lora-dir", str(DEMO), "--output-dir", str(tmp_path / "out"),
            "--disk-cache-dir", str(disk)]
    assert main(argv) == 0
    (entry,) = entries(disk)
    entry.write_bytes(entry.read_bytes()[:-100])
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"note: node 4 (PeftMerge): disk cache entry {entry.name} discarded" in err, err
    assert "node 4 (PeftMerge) done" in err and "Traceback" not in err
    assert len(entries(disk)) == 1, "the merge was stored again"
    assert main(argv) == 0
    assert "cached (disk): node 4" in capsys.readouterr().err


def test_cache_info_and_clear(tmp_path, monkeypatch, capsys):
    disk = tmp_path / "disk"
    monkeypatch.setenv("LORALOOM_DISK_CACHE_BYTES", "1000000000")
    assert main(["run", str(workflow(tmp_path)), "--lora-dir", str(DEMO), "--output-dir", str(tmp_path / "out"),
                 "--disk-cache-dir", str(disk), "--no-progress"]) == 0
    size = entries(disk)[0].stat().st_size
    capsys.readouterr()
    assert main(["cache", "info", "--disk-cache-dir", str(disk)]) == 0
    out = capsys.readouterr().out
    assert f"disk cache: {disk}" in out and f"1 entry, {size / 2**20:.1f} MiB ({size} bytes)" in out
    assert "budget 953.7 MiB (1000000000 bytes)" in out
    monkeypatch.setenv("LORALOOM_DISK_CACHE_DIR", str(disk))  # the variable names the folder too
    assert main(["cache", "clear"]) == 0
    assert f"cleared {disk}: 1 entry," in capsys.readouterr().out
    assert entries(disk) == []
    monkeypatch.setenv("LORALOOM_DISK_CACHE_BYTES", "0")
    assert main(["cache", "info"]) == 0
    assert "0 entries" in (out := capsys.readouterr().out) and "off (budget 0)" in out


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="the server needs the editor extra")
def test_serve_takes_the_disk_cache_flags(tmp_path, monkeypatch):
    import loraloom.server

    served = []
    monkeypatch.setattr(loraloom.server, "serve", lambda runtime, config: served.append(runtime))
    base = ["serve", "--port", "0", "--user-dir", str(tmp_path / "user"), "--output-dir", str(tmp_path / "out")]
    assert main(base + ["--disk-cache-dir", str(tmp_path / "d"), "--disk-cache-bytes", "123"]) == 0
    assert (served[-1].disk_cache.root, served[-1].disk_cache.max_bytes) == (tmp_path / "d", 123)
    assert main(base + ["--no-disk-cache"]) == 0 and not served[-1].disk_cache.enabled
