"""Sweeps on Ray: a 5x5 LoRA-weight grid (workflows/api/blend_api.json on tiny-sdxl, LoRA A's weight x
LoRA B's) run by the Ray executor on a local cluster of two one-CPU workers, against the same cells
run by the local executor in this one process (one torch thread each, so the images are
bit-identical and the comparison is two processes against one). Each round starts from cold
runtimes (no model loaded; the actors' processes already up, their start timed apart), then runs a
grid of other weights on the same, now warm, runtimes (what a second sweep of a session costs).
Then every cell once more, one at a time, where nothing re-runs: the wall time of a cell minus the
time its runtime spent is what routing it to an actor and returning its image cost.

    python bench/bench_sweep_ray.py [--quick] [--grid 5] [--steps 4] [--size 64] [--rounds 2] [--json OUT]

Without Ray installed (``pip install 'loraloom[ray]'``) the row says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import REPO, add_common_args, machine, median, setup_threads


def grid_cells(rt, n: int, steps: int, size: int, shift: float = 0.0) -> list:
    """The n x n cells over the blend's two LoRA weights (0..1, plus ``shift``). Each cell's affinity
    is its own, as the sweep planner gives for a weight grid (the sampler's model state differs in
    every cell)."""
    from loraloom.graph_runtime import load_workflow
    from loraloom.sweep.cell import Cell, image_sources

    prompt = load_workflow(REPO / "workflows" / "api" / "blend_api.json", rt.registry).prompt
    prompt["5"]["inputs"].update(steps=steps, width=size, height=size)
    weights = [round(shift + i / (n - 1), 3) for i in range(n)]
    cells = []
    for y, b in enumerate(weights):
        for x, a in enumerate(weights):
            cell_prompt = {nid: {**node, "inputs": dict(node["inputs"])} for nid, node in prompt.items()}
            cell_prompt["4"]["inputs"].update(weight=a, weight_2=b)
            cells.append(Cell(len(cells), (x, y), {"4.weight": a, "4.weight_2": b}, cell_prompt,
                              image_sources(cell_prompt), affinity=f"{a}/{b}"))
    return cells


def timed_run(executor, cells, job) -> tuple[float, dict]:
    start = time.perf_counter()
    results = {r.index: r for r in executor.run(cells, job)}
    return time.perf_counter() - start, results


def one_by_one(executor, cells, job) -> list[tuple[float, float]]:
    """(wall, time inside the runtime) of each cell sent alone."""
    out = []
    for cell in cells:
        start = time.perf_counter()
        (result,) = executor.run([cell], job)
        out.append((time.perf_counter() - start, result.seconds))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "a 3x3 grid, 2 steps, one round")
    parser.add_argument("--grid", type=int, default=5, help="cells per side (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per cell (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, local then Ray (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.grid, args.steps, args.rounds = 3, 2, 1
    threads = setup_threads(args.threads or 1)
    try:
        import ray
    except ImportError:
        figures = {"skipped": "Ray is not installed (pip install 'loraloom[ray]')"}
        print(f"sweeps on Ray: skipped, {figures['skipped']}")
    else:
        figures = measure(ray, args, threads)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


def measure(ray, args, threads: int) -> dict:
    import numpy as np

    from loraloom.api import Runtime
    from loraloom.sweep.executor import LocalExecutor, SweepJob
    from loraloom.sweep.ray_executor import LOCAL_OBJECT_STORE_BYTES, RayExecutor

    out_dir = Path(tempfile.mkdtemp(prefix="loraloom-bench-ray-"))
    probe = Runtime(output_dir=out_dir, demo_loras=True)
    job = SweepJob.from_runtime(probe)
    cold = grid_cells(probe, args.grid, args.steps, args.size)
    warm = grid_cells(probe, args.grid, args.steps, args.size, shift=0.05)  # other weights: re-patched, re-sampled
    start = time.perf_counter()
    ray.init(num_cpus=2, object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False)
    cluster_s = time.perf_counter() - start
    ray_ex = RayExecutor(workers=2, threads=threads)
    seconds = {"local_cold": [], "ray_cold": [], "local_warm": [], "ray_warm": [], "actors": []}
    try:
        for _ in range(args.rounds):
            local = LocalExecutor(Runtime(output_dir=out_dir, demo_loras=True))  # cold: no model loaded
            for name, cells in (("local_cold", cold), ("local_warm", warm)):
                took, local_results = timed_run(local, cells, job)
                seconds[name].append(took)
            ray_ex.close_actors()
            start = time.perf_counter()
            ray_ex.start(job)  # fresh actors, cold runtimes; their process start timed apart
            seconds["actors"].append(time.perf_counter() - start)
            for name, cells in (("ray_cold", cold), ("ray_warm", warm)):
                took, ray_results = timed_run(ray_ex, cells, job)
                seconds[name].append(took)
        identical = sum(all(np.array_equal(a, b) for a, b in zip(ray_results[i].images["6"], local_results[i].images["6"]))
                        for i in local_results)
        local_cached = one_by_one(local, warm, job)
        ray_cached = one_by_one(ray_ex, warm, job)
    finally:
        ray_ex.close()
        ray.shutdown()
    per_worker = {}
    for result in ray_results.values():
        per_worker.setdefault(result.worker, []).append(result.index)
    image_bytes = ray_results[0].images["6"][0].nbytes
    med = {name: median(values) for name, values in seconds.items()}
    figures = {
        "grid": f"{args.grid}x{args.grid}", "cells": len(cold), "steps": args.steps, "size": args.size,
        "rounds": args.rounds, "workers": 2, "torch_threads": threads, "seconds": seconds,
        **{f"{name}_s": value for name, value in med.items() if name != "actors"},
        "cold_ratio": med["local_cold"] / med["ray_cold"], "warm_ratio": med["local_warm"] / med["ray_warm"],
        "cluster_start_s": cluster_s, "actors_start_s": med["actors"],
        "cells_per_worker": {w: len(v) for w, v in sorted(per_worker.items())},
        "identical_images": identical,
        "cached_cell_local_ms": 1000 * median([w for w, _ in local_cached]),
        "cached_cell_ray_ms": 1000 * median([w for w, _ in ray_cached]),
        "route_and_return_ms": 1000 * median([w - inside for w, inside in ray_cached]),
        "image_bytes": image_bytes, "machine": machine(threads),
    }
    print(f"sweeps on Ray: a {figures['grid']} LoRA-weight grid on tiny-sdxl ({args.steps} steps, {args.size} px), "
          f"{args.rounds} round(s), torch threads {threads}")
    print(f"  cold (models loaded in the run)  local {figures['local_cold_s']:.2f} s, Ray {figures['ray_cold_s']:.2f} s: "
          f"throughput {figures['cold_ratio']:.2f}x")
    print(f"  warm (other weights, same runtimes) local {figures['local_warm_s']:.2f} s, Ray {figures['ray_warm_s']:.2f} s: "
          f"throughput {figures['warm_ratio']:.2f}x (cells per worker {figures['cells_per_worker']})")
    print(f"  start: cluster {cluster_s:.2f} s, two actors {figures['actors_start_s']:.2f} s (once per sweep)")
    print(f"  images identical to the local run: {identical}/{len(cells)}")
    print(f"  a cached cell sent alone: local {figures['cached_cell_local_ms']:.1f} ms, Ray "
          f"{figures['cached_cell_ray_ms']:.1f} ms; routing + return {figures['route_and_return_ms']:.1f} ms "
          f"per cell ({image_bytes} B image)")
    return figures


if __name__ == "__main__":
    main()
