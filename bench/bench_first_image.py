"""First image: a fresh process running ``loraloom run workflows/blend.json`` (and the README's quick
start, ``workflows/shapes_blend.json``) into a temp output folder, wall time from spawn to exit, median
of N rounds; beside it the floor every diffusers script pays before doing anything (a fresh process
importing torch, diffusers' SDXL pipeline classes, transformers' CLIP and peft), and the commands that
build nothing (``--help``, ``validate``), and blend.json once more with one torch thread
(OMP_NUM_THREADS=1): on a busy machine torch's default of one thread per core waits on the others' work
at every small op (its figure is for comparison; one thread also changes the image's last bits).
Rounds interleave the commands, so load on the machine falls
on all of them alike.

The breakdown of a run comes from its own ``--events jsonl`` lines, stamped as they arrive: the time to
``execution_start`` (interpreter, imports, loading and validating the workflow), each node's own
seconds, and the time from ``execution_success`` to the process's exit (interpreter teardown).

    python bench/bench_first_image.py [--quick] [--rounds N] [--threads 1] [--json OUT]

Which ``loraloom`` runs is whatever ``python -m loraloom.cli`` imports (PYTHONPATH decides): run it
once with an older checkout on PYTHONPATH for a before/after.
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

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = ("blend", "shapes_blend")
TARGET_S = 10.0
# What a diffusers script imports before it does anything with the tiny SDXL presets' classes.
FLOOR = ("import torch, peft, diffusers, transformers; "
         "from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel; "
         "from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer")


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def run_workflow(name: str, out_dir: Path, env: dict) -> dict:
    """One fresh ``loraloom run``; its wall time and the breakdown from its events."""
    cmd = [sys.executable, "-m", "loraloom.cli", "run", f"workflows/{name}.json", "--output-dir", str(out_dir),
           "--events", "jsonl", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    stamps, nodes = {}, {}
    for line in proc.stdout:
        event = json.loads(line)
        stamps.setdefault(event["event"], time.perf_counter() - start)
        if event["event"] == "executed":
            nodes[f"{event['node']} {event['class_type']}"] = event["seconds"]
    err = proc.stderr.read()
    if proc.wait() != 0 or "execution_success" not in stamps:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    wall = time.perf_counter() - start
    return {"wall_s": wall, "to_start_s": stamps["execution_start"], "nodes_s": nodes,
            "run_s": stamps["execution_success"] - stamps["execution_start"],
            "exit_s": wall - stamps["execution_success"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round (CI: that the row works)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in the measured processes (OMP_NUM_THREADS; default 0: torch's own "
                             "choice, what a user gets)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    else:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(name, None)
    cli = [sys.executable, "-m", "loraloom.cli"]
    one_thread = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    samples: dict[str, list] = {"floor_s": [], "help_s": [], "validate_s": [], "blend_1_thread": [],
                                **{w: [] for w in WORKFLOWS}}
    with tempfile.TemporaryDirectory(prefix="loraloom_first_image_") as tmp:
        for i in range(rounds):
            samples["floor_s"].append(timed([sys.executable, "-c", FLOOR], env))
            for name in WORKFLOWS:
                samples[name].append(run_workflow(name, Path(tmp) / f"out{i}", env))
            samples["blend_1_thread"].append(run_workflow("blend", Path(tmp) / f"one{i}", one_thread))
            samples["help_s"].append(timed(cli + ["--help"], env))
            samples["validate_s"].append(timed(cli + ["validate", "workflows/shapes_blend.json"], env))
            print(f"round {i + 1}/{rounds}: floor {samples['floor_s'][-1]:.2f} s, "
                  + ", ".join(f"{w} {samples[w][-1]['wall_s']:.2f} s" for w in WORKFLOWS), flush=True)
    median = statistics.median
    figures = {"rounds": rounds, "threads": args.threads, "target_s": TARGET_S,
               "floor_s": median(samples["floor_s"]), "help_s": median(samples["help_s"]),
               "validate_s": median(samples["validate_s"]), "load_average": round(os.getloadavg()[0], 2),
               "workflows": {}}
    for name in (*WORKFLOWS, "blend_1_thread"):
        runs = samples[name]
        part = {key: median(r[key] for r in runs) for key in ("wall_s", "to_start_s", "run_s", "exit_s")}
        part["nodes_s"] = {node: median(r["nodes_s"][node] for r in runs) for node in runs[0]["nodes_s"]}
        part["walls_s"] = [r["wall_s"] for r in runs]
        figures["workflows"][name] = part
    print(f"\nmedians of {rounds} round(s); floor (import torch, diffusers, transformers, peft): "
          f"{figures['floor_s']:.2f} s; --help {figures['help_s']:.2f} s; validate {figures['validate_s']:.2f} s")
    for name, part in figures["workflows"].items():
        verdict = "met" if part["wall_s"] < TARGET_S else "MISSED"
        print(f"{name}: {part['wall_s']:.2f} s wall (target < {TARGET_S:.0f} s: {verdict}); to the first "
              f"node {part['to_start_s']:.2f} s, nodes {part['run_s']:.2f} s, exit {part['exit_s']:.2f} s")
        print("  " + ", ".join(f"{node} {s:.2f} s" for node, s in part["nodes_s"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
