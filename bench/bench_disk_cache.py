"""A merge workflow run from the command line again and again: each `loraloom run` is a new process, so
before the disk cache every run merged again. Runs LoadLoRA x2 -> PeftMerge (svd) -> SaveLoRA as
three CLI processes per round, side by side: the first with an empty disk cache (merges and stores),
the second on what the first stored (reads the merge back), the third with --no-disk-cache (what
every run did before). Prints wall times, the merge's own time, the entry's size and whether the
second process merged (it must not).

    python bench/bench_disk_cache.py [--quick] [--method svd] [--rounds N] [--threads N] [--json OUT]

Default: two random rank-32 LoRAs on every attention, feed-forward, projection and resnet conv layer
of the real SDXL UNet shapes (767 modules, from the real config on the meta device: no weights are
built), bf16 kohya files, merged with ``--method`` (default `svd`, a few seconds; `ties_svd` takes
minutes) at rank 32. ``--quick`` (CI): a small SDXL-like UNet, rank 16. Also times reading the entry
back in this process (the strict reader, warm page cache): what a hit costs instead of the merge.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_common_args, machine, setup_threads, write_json

REPO = Path(__file__).resolve().parent.parent


def write_loras(folder: Path, quick: bool) -> dict:
    """Two random LoRAs as kohya files in ``folder``; returns what they are."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench_lora_loading import UNET_SDXL
    from bench_merge import QUICK_UNET
    from common import random_lora
    from loraloom.lora.writers import write_kohya

    config, rank = (QUICK_UNET, 16) if quick else (UNET_SDXL, 32)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    sizes = []
    for name, seed in (("a", 1), ("b", 2)):
        lora = random_lora(unet, rank, float(rank), seed, torch.bfloat16)
        path = write_kohya(lora, folder / f"{name}.safetensors", arch="sdxl")
        sizes.append(path.stat().st_size)
    return {"modules": lora.n_modules, "rank": rank, "dtype": "bf16", "file_mib": [s / 2**20 for s in sizes]}


def workflow(rank: int, method: str) -> dict:
    return {
        "1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "a.safetensors"}},
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": "b.safetensors"}},
        "3": {"class_type": "PeftMerge", "inputs": {"lora_a": ["1", 0], "weight_a": 1.0, "lora_b": ["2", 0],
                                                    "weight_b": 0.8, "method": method, "density": 0.5,
                                                    "majority_sign_method": "total", "svd_rank": rank,
                                                    "svd_clamp": 0.0, "seed": 0}},
        "4": {"class_type": "SaveLoRA", "inputs": {"lora": ["3", 0], "filename_prefix": "loras/merged",
                                                   "format": "kohya", "dtype": "fp16"}},
    }


def cli_run(wf: Path, loras: Path, out: Path, disk: Path, *flags: str) -> dict:
    """One ``loraloom run`` process: its wall time, and from its events which nodes ran, which came
    from the disk cache and how long the merge took."""
    cmd = [sys.executable, "-m", "loraloom.cli", "run", str(wf), "--lora-dir", str(loras), "--output-dir", str(out),
           "--disk-cache-dir", str(disk), "--events", "jsonl", "--no-progress", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOM_DISK_CACHE")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"loraloom run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    executed = {e["node"]: e["seconds"] for e in events if e["event"] == "executed"}
    disk = next((e.get("disk", []) for e in events if e["event"] == "execution_cached"), [])
    return {"wall_s": wall, "merge_s": executed.get("3"), "merged": "3" in executed, "disk_hit": "3" in disk,
            "notes": [e["message"] for e in events if e["event"] == "cache_note"]}


def entry_read_s(disk: Path) -> float:
    """Seconds to read the stored entry back through the codec (strict reader, digest, values),
    fastest of 3 (warm page cache, as in the second process right after the first)."""
    from loraloom.nodes.merge import PeftMerge

    (path,) = disk.glob("??/*.safetensors")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        PeftMerge.SCHEMA.persist.load(path)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "a small SDXL-like UNet, rank 16, one round (CI)")
    parser.add_argument("--rounds", type=int, help="rounds of (store, hit, off) processes (default 3; --quick 1)")
    parser.add_argument("--method", default="svd", help="PeftMerge's method (default: %(default)s)")
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="loraloom_bench_disk_") as tmp:
        tmp = Path(tmp)
        loras, out, disk = tmp / "loras", tmp / "out", tmp / "disk"
        loras.mkdir()
        made = write_loras(loras, args.quick)
        wf = tmp / "merge.json"
        wf.write_text(json.dumps(workflow(made["rank"], args.method)))
        print(f"LoRAs: 2 x {made['modules']} modules, rank {made['rank']}, {made['dtype']}, "
              f"{made['file_mib'][0]:.0f} MiB each; {args.method} merge at rank {made['rank']}; {rounds} round(s)",
              flush=True)
        runs = {"store": [], "hit": [], "off": []}
        entry_bytes = 0
        for i in range(rounds):
            subprocess.run([sys.executable, "-m", "loraloom.cli", "cache", "clear", "--disk-cache-dir", str(disk)],
                           capture_output=True, cwd=REPO, check=True)
            runs["store"].append(cli_run(wf, loras, out, disk))
            entry_bytes = sum(p.stat().st_size for p in disk.glob("??/*.safetensors"))
            runs["hit"].append(cli_run(wf, loras, out, disk))
            runs["off"].append(cli_run(wf, loras, out, disk, "--no-disk-cache"))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.2f} s" for k, v in runs.items()), flush=True)
        read_s = entry_read_s(disk)
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    merge_s = statistics.median(r["merge_s"] for r in runs["store"] + runs["off"])
    figures = {
        "loras": made, "rounds": rounds, "entry_mib": entry_bytes / 2**20,
        "first_process_s": med["store"], "second_process_s": med["hit"], "no_disk_cache_s": med["off"],
        "second_vs_no_cache": med["hit"] / med["off"], "second_vs_first": med["hit"] / med["store"],
        "merge_s": merge_s, "entry_read_s": read_s, "method": args.method, "second_merged": any(r["merged"] for r in runs["hit"]),
        "second_disk_hits": sum(r["disk_hit"] for r in runs["hit"]),
        "notes": [n for v in runs.values() for r in v for n in r["notes"]],
        "machine": machine(threads),
    }
    print(f"first process (merge + store) {med['store']:.2f} s, second (from disk) {med['hit']:.2f} s, "
          f"--no-disk-cache {med['off']:.2f} s (medians); the merge itself {merge_s:.2f} s; entry "
          f"{figures['entry_mib']:.0f} MiB, read back in {read_s:.2f} s; second process merged: {figures['second_merged']}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
