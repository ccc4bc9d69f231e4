"""Sweep: a 5x5 LoRA-weight grid (``4.weight`` x ``4.weight_2`` of workflows/api/blend_api.json on tiny-sdxl)
three ways, each in a fresh process, wall time from spawn to exit:

- ours: one ``loraloom sweep`` (cell images, grid, manifest written);
- naive: one ``loraloom run --set 4.weight=A --set 4.weight_2=B`` per cell, a fresh process each
  (what a user with a shell loop does);
- one process: 25 ``Runtime.run`` calls with those overrides in one Python process (a careful script).

The sweep and the one-process script run ``--rounds`` times, interleaved (medians); the 25 fresh
processes once (each is a repeat of the same cost).

Beside the times, the counts: node executions (from the sweep's manifest, the runs' ``--events jsonl``
and the RunResults) and layers the model pool re-patched (the sweep's manifest; the pool's counter in
the one-process script; a fresh ``run`` patches every LoRA layer from the pristine base once, and that
count is not visible from outside its process, so the naive side shows n/a). The sampler settings are
lowered to keep 25 fresh processes within minutes (``--steps``, 64 px): the shares of loading and
sampling in a cell follow from them, so the ratios are for these settings.

    python bench/bench_sweep.py [--quick] [--grid 5] [--steps 4] [--rounds 3] [--naive-cells N] [--json OUT]
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
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = "workflows/api/blend_api.json"
SIZE = 64


def values(n: int) -> list[float]:
    return [round(i / (n - 1), 4) for i in range(n)] if n > 1 else [1.0]


def settings(steps: int) -> list[str]:
    return ["--set", f"5.steps={steps}", "--set", f"5.width={SIZE}", "--set", f"5.height={SIZE}"]


def run_sweep(n: int, steps: int, out: Path, env: dict) -> dict:
    grid = ",".join(map(str, values(n)))
    cmd = [sys.executable, "-m", "loraloom.cli", "sweep", WORKFLOW, *settings(steps), "--axis", f"4.weight={grid}",
           "--axis", f"4.weight_2={grid}", "--out", str(out), "--no-progress", "--no-disk-cache"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    executions = Counter(nid for r in records for nid in r["executed"])
    return {"wall_s": wall, "cells": len(records), "executions": dict(executions),
            "patched_layers": sum(r["patched_layers"] for r in records), "loads": sum(r["loads"] for r in records)}


def run_naive(n: int, steps: int, out: Path, env: dict, cells: int | None) -> dict:
    """One fresh ``loraloom run`` per cell (the first ``cells`` of the grid, row-major; the wall time of all
    of them is then that of these times the grid's cell count over ``cells``)."""
    grid = [(a, b) for b in values(n) for a in values(n)][:cells]
    walls, executions = [], Counter()
    for a, b in grid:
        cmd = [sys.executable, "-m", "loraloom.cli", "run", WORKFLOW, *settings(steps), "--set", f"4.weight={a}",
               "--set", f"4.weight_2={b}", "--output-dir", str(out), "--events", "jsonl", "--no-progress",
               "--no-disk-cache"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        executions.update(json.loads(line)["node"] for line in proc.stdout.splitlines()
                          if json.loads(line)["event"] == "executed")
    scale = n * n / len(grid)
    return {"wall_s": sum(walls) * scale, "measured_cells": len(grid), "per_cell_s": sum(walls) / len(grid),
            "executions": {k: round(v * scale) for k, v in executions.items()}}


ONE_PROCESS = """
import json, sys, time
from collections import Counter
from loraloom.api import Runtime
n, steps, size, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
values = [round(i / (n - 1), 4) for i in range(n)] if n > 1 else [1.0]
rt = Runtime(output_dir=out, demo_loras=True, disk_cache_bytes=0)
executions = Counter()
for b in values:
    for a in values:
        result = rt.run("workflows/api/blend_api.json", {"5.steps": steps, "5.width": size, "5.height": size,
                                                     "4.weight": a, "4.weight_2": b})
        executions.update(result.executed)
stats = rt.resources["model_pool"].stats
print(json.dumps({"executions": dict(executions), "patched_layers": stats["patched_layers"], "loads": stats["loads"]}))
"""


def run_one_process(n: int, steps: int, out: Path, env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(n), str(steps), str(SIZE), str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the one-process script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _medians(runs: list[dict]) -> dict:
    """The first run's counts (every run's are the same) with the median wall time of all."""
    walls = [r["wall_s"] for r in runs]
    return {**runs[0], "wall_s": statistics.median(walls), "walls_s": walls}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2x2 grid, 2 steps (CI: that the row works)")
    parser.add_argument("--grid", type=int, help="values per axis (default 5; 2 with --quick)")
    parser.add_argument("--steps", type=int, help="sampling steps per cell (default 4; 2 with --quick)")
    parser.add_argument("--naive-cells", type=int,
                        help="fresh `loraloom run` processes actually run (default: every cell); the naive time is "
                             "scaled from them to the whole grid")
    parser.add_argument("--rounds", type=int, help="rounds of the sweep and the one-process script, interleaved; "
                        "medians (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every process (default %(default)s)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    n = args.grid or (2 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 4)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory(prefix="loraloom_bench_sweep_") as tmp:
        tmp = Path(tmp)
        sweeps, ones = [], []
        for i in range(args.rounds or (1 if args.quick else 3)):
            sweeps.append(run_sweep(n, steps, tmp / f"sweep{i}", env))  # a new folder: nothing to resume
            ones.append(run_one_process(n, steps, tmp / f"one{i}", env))
            print(f"round {i + 1}: sweep {sweeps[-1]['wall_s']:.1f} s, one process {ones[-1]['wall_s']:.1f} s", flush=True)
        ours, one = (_medians(runs) for runs in (sweeps, ones))
        naive = run_naive(n, steps, tmp / "naive", env, args.naive_cells)
        print(f"naive: {naive['wall_s']:.1f} s ({naive['measured_cells']} processes run)", flush=True)
    figures = {"grid": n, "cells": n * n, "steps": steps, "size": SIZE, "threads": args.threads,
               "load_average": round(os.getloadavg()[0], 2), "sweep": ours, "one_process": one, "naive": naive,
               "naive_vs_sweep": naive["wall_s"] / ours["wall_s"], "one_process_vs_sweep": one["wall_s"] / ours["wall_s"]}
    print(f"\n{n}x{n} grid, {steps} steps at {SIZE} px:")
    for name in ("sweep", "one_process", "naive"):
        part = figures[name]
        runs = ", ".join(f"{k}: {v}" for k, v in sorted(part["executions"].items()))
        print(f"  {name:<12} {part['wall_s']:7.1f} s   node runs {runs}   re-patched layers "
              f"{part.get('patched_layers', 'n/a')}")
    print(f"  naive / sweep {figures['naive_vs_sweep']:.2f}x, one process / sweep {figures['one_process_vs_sweep']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
