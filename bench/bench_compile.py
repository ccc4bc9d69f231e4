"""Row 4, compile: on a torch.compile'd UNet, how many graphs get compiled again, and how long the
next sample takes, after a LoRA weight change, a LoRA swap and a re-fuse. Ours vs diffusers.

Scale: tiny-sdxl (compiling the real SDXL UNet on a CPU takes far too long), 4 steps at 64 px, the
two demo LoRAs at [0.7, 0.8] plus a third LoRA file for the swap (demo-b with its up factors
negated). Compile options everywhere: ``unet.compile()`` defaults (inductor, fullgraph off),
which is what our Compile node's defaults do.

Paths, each in its own process (clean dynamo caches and counters):
  ours             the shipped fuse_compile workflow in a Runtime (Fuse -> Compile -> Sample); edits:
                   WeightedBlend weight 0.7 -> 0.5; LoadLoRA 3 -> the third file; Fuse lora_scale -> 0.5.
  diffusers        diffusers' compiled path with active (unfused) adapters: load_lora_weights x2,
                   set_adapters, pipe.unet.compile(); edits: set_adapters with a new weight;
                   load_lora_weights(third) + set_adapters; fuse_lora().
  diffusers-fused  the same with fuse_lora() before compiling (the fuse_compile workflow's order);
                   edits: unfuse_lora + set_adapters + fuse_lora; unfuse_lora + load_lora_weights(third)
                   + set_adapters + fuse_lora; unfuse_lora + fuse_lora(lora_scale=0.5).
A "prompt edit" sample before the edits gives each path's steady sample time. Graphs compiled =
the rise of torch._dynamo's ``unique_graphs`` counter.

The inductor cache is kept in ~/.cache/loraloom/bench-inductor between runs (as LoRA Loom's own
~/.cache/loraloom/inductor is for a user, so a user's second session is warm); its hits and misses
are reported. ``--cold`` uses an empty cache (each graph then takes one to two minutes here).

First sample, cold vs warm (not with ``--quick``): our path's first sample (building the base,
reading and fusing the LoRAs, compiling, 4 steps) in a process with an empty inductor cache
(``ours-cold``), then in a second process given the cache the first one left (``ours-warm``), as a
user's first and second ``loraloom run`` see it; each also times the prompt edit after it.

    python bench/bench_compile.py [--quick] [--threads 1] [--cold] [--paths ours,diffusers,diffusers-fused] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, DEMO_LORAS, add_common_args, machine, setup_threads, timed, write_json  # noqa: E402

PATHS = ("ours", "diffusers", "diffusers-fused")
FIRST = ("ours-cold", "ours-warm")  # our first sample in two processes sharing an empty inductor cache
WORKFLOW = REPO / "workflows" / "api" / "fuse_compile_api.json"
CACHE = Path.home() / ".cache" / "loraloom" / "bench-inductor"
SAMPLE = {"steps": 4, "width": 64, "height": 64}


def _counters() -> dict:
    import torch._dynamo.utils as dynamo_utils

    c = dynamo_utils.counters
    return {"graphs": c["stats"]["unique_graphs"], "cache_hits": c["inductor"]["fxgraph_cache_hit"],
            "cache_misses": c["inductor"]["fxgraph_cache_miss"]}


def _event(events: list, name: str, fn) -> None:
    before = _counters()
    seconds, _ = timed(fn)
    after = _counters()
    events.append({"event": name, "seconds": seconds, **{k: after[k] - before[k] for k in after}})
    print(f"    {name:<14} {seconds:8.2f} s  graphs compiled {after['graphs'] - before['graphs']}", file=sys.stderr, flush=True)


def write_third_lora(folder: Path) -> Path:
    """demo-b with its up factors negated: same modules and ranks, a different LoRA."""
    import dataclasses

    from loraloom.lora.canonical import derived_fingerprint
    from loraloom.lora.readers import read_lora
    from loraloom.lora.writers import write_kohya

    lora = read_lora(DEMO_LORAS / "demo-b.safetensors")
    components = {c: {p: dataclasses.replace(m, up=-m.up) for p, m in mods.items()} for c, mods in lora.components.items()}
    third = lora.replace(components=components, fingerprint=derived_fingerprint("negate-up", [lora.fingerprint]))
    return write_kohya(third, folder / "demo-c.safetensors", arch="sdxl")


def run_ours(tmp: Path, edits: bool = True) -> list:
    from loraloom import Runtime

    wf = json.loads(WORKFLOW.read_text())
    wf["5"]["inputs"].update(SAMPLE)
    rt = Runtime(lora_dirs=[str(tmp)], output_dir=str(tmp / "out"), demo_loras=True)
    events: list = []

    def run(**edits):
        for key, value in edits.items():
            node, name = key.split("__")
            wf[node]["inputs"][name] = value
        return lambda: rt.run(wf, outputs=["8"])  # SavePipeline (node 9) is not part of the loop

    _event(events, "first sample", run())
    _event(events, "prompt edit", run(**{"5__prompt": "a lighthouse in fog"}))
    if not edits:
        return events
    _event(events, "weight change", run(**{"4__weight": 0.5}))
    _event(events, "LoRA swap", run(**{"3__lora_name": "demo-c.safetensors"}))
    _event(events, "re-fuse", run(**{"6__lora_scale": 0.5}))
    return events


def run_diffusers(tmp: Path, fused: bool) -> list:
    import torch

    from loraloom.bases.presets import build_pipeline

    pipe = build_pipeline("tiny-sdxl", dtype="auto", device="auto")
    pipe.load_lora_weights(str(DEMO_LORAS / "demo-a.safetensors"), adapter_name="demo_a")
    pipe.load_lora_weights(str(DEMO_LORAS / "demo-b.safetensors"), adapter_name="demo_b")
    pipe.set_adapters(["demo_a", "demo_b"], [0.7, 0.8])
    if fused:
        pipe.fuse_lora()
    pipe.unet.compile()
    third = str(tmp / "demo-c.safetensors")
    prompt = ["a watercolor painting of a lighthouse at dusk"]

    def sample():
        with torch.inference_mode():
            pipe(prompt=prompt[0], num_inference_steps=SAMPLE["steps"], width=SAMPLE["width"], height=SAMPLE["height"],
                 guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(42), output_type="pt")

    def edit(*steps):
        def go():
            for step in steps:
                step()
            sample()
        return go

    def new_prompt():
        prompt[0] = "a lighthouse in fog"

    events: list = []
    _event(events, "first sample", sample)
    _event(events, "prompt edit", edit(new_prompt))
    if fused:
        _event(events, "weight change", edit(pipe.unfuse_lora, lambda: pipe.set_adapters(["demo_a", "demo_b"], [0.5, 0.8]),
                                             pipe.fuse_lora))
        _event(events, "LoRA swap", edit(pipe.unfuse_lora, lambda: pipe.load_lora_weights(third, adapter_name="demo_c"),
                                         lambda: pipe.set_adapters(["demo_a", "demo_c"], [0.5, 0.8]), pipe.fuse_lora))
        _event(events, "re-fuse", edit(pipe.unfuse_lora, lambda: pipe.fuse_lora(lora_scale=0.5)))
    else:
        _event(events, "weight change", edit(lambda: pipe.set_adapters(["demo_a", "demo_b"], [0.5, 0.8])))
        _event(events, "LoRA swap", edit(lambda: pipe.load_lora_weights(third, adapter_name="demo_c"),
                                         lambda: pipe.set_adapters(["demo_a", "demo_c"], [0.5, 0.8])))
        _event(events, "re-fuse", edit(pipe.fuse_lora))
    return events


def worker(path: str, tmp: Path, threads: int) -> dict:
    setup_threads(threads)
    print(f"  {path}:", file=sys.stderr, flush=True)
    if path in FIRST:
        events = run_ours(tmp, edits=False)
    else:
        events = run_ours(tmp) if path == "ours" else run_diffusers(tmp, fused=path == "diffusers-fused")
    return {"path": path, "events": events}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "ours only, for CI (diffusers' paths compile 5 more graphs, minutes on a CPU)")
    parser.add_argument("--cold", action="store_true", help="an empty inductor cache (slow: every graph compiles)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "TMP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]), args.threads)))
        return 0

    paths = ["ours"] if args.quick else [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; valid: {', '.join(PATHS)}")
    threads = setup_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    cache = tmp / "inductor" if args.cold else CACHE
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
    write_third_lora(tmp)
    cached_before = sum(1 for _ in cache.rglob("*")) if cache.exists() else 0
    result = {"row": "compile", "mode": "quick" if args.quick else "full", "machine": machine(threads),
              "scale": f"tiny-sdxl, {SAMPLE['steps']} steps at {SAMPLE['width']} px",
              "inductor_cache": "empty (--cold)" if args.cold else f"persistent, {cached_before} files before the run",
              "paths": {}}
    print(f"compile: {result['scale']}, {threads} thread(s), inductor cache {result['inductor_cache']}", flush=True)
    for path in paths:
        proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--worker", path, str(tmp)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            result["paths"][path] = {"error": proc.stderr[-3000:]}
            print(f"  {path}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            continue
        events = json.loads(proc.stdout.strip().splitlines()[-1])["events"]
        result["paths"][path] = {"events": events}
        steady = next(e["seconds"] for e in events if e["event"] == "prompt edit")
        print(f"  {path}: " + "; ".join(f"{e['event']} {e['graphs']} graph(s) {e['seconds']:.2f} s"
                                       + (f" ({e['seconds'] / steady:.1f}x a prompt edit)" if e["event"] not in
                                          ("first sample", "prompt edit") else "")
                                       for e in events)
              + f"; inductor cache hits {sum(e['cache_hits'] for e in events)}, misses "
                f"{sum(e['cache_misses'] for e in events)}", flush=True)
    if not args.quick:
        result["first_sample"] = first_sample(tmp, args.threads)
    write_json(args.json, result)
    return 0


def first_sample(tmp: Path, threads: int) -> dict:
    """Our path's first sample in a process with an empty inductor cache, then in the next process
    with the cache the first one left (what a user's second run sees), side by side in one run."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp / "first-inductor"))
    out = {}
    for path in FIRST:
        proc = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--worker", path, str(tmp)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  {path}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            return {"error": proc.stderr[-3000:]}
        events = json.loads(proc.stdout.strip().splitlines()[-1])["events"]
        out[path] = {e["event"]: e for e in events}
    cold, warm = out["ours-cold"]["first sample"], out["ours-warm"]["first sample"]
    steady = out["ours-warm"]["prompt edit"]["seconds"]
    print(f"  first sample (import excluded): cold {cold['seconds']:.1f} s (cache misses {cold['cache_misses']}), "
          f"warm {warm['seconds']:.1f} s (hits {warm['cache_hits']}, misses {warm['cache_misses']}); "
          f"a prompt edit after it {steady:.2f} s", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
