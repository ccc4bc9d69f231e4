"""Merging two LoRAs: ours (`merge_loras` on the factors) against the guide's flow (deepcopy of the
UNet -> get_peft_model -> load two adapters -> add_weighted_adapter), for svd, ties_svd,
dare_linear and cat. Prints time, peak RSS and how far the merged deltas are apart per module,
measured side by side in one run, plus each side's distance from the exact weighted sum.

    python bench/bench_merge.py [--quick | --full] [--arch sdxl|flux] [--methods svd,ties_svd,dare_linear,cat]
                                [--threads N] [--repeat N] [--before DIR | --no-before] [--json OUT]

Modes:
  --quick  a small SDXL-like UNet (132 modules, rank 16 + 16): every side runs in full, fastest of
           3 runs. CI, about 80 s.
  default  real SDXL UNet shapes (722 modules: to_q/k/v/out on all 140 attentions, ff.net.0.proj and
           ff.net.2 on 70 transformer blocks, proj_in/out; from the real SDXL config, built on the
           meta device), ranks 32 + 32, bf16 inputs. Ours runs in full. The guide runs in full for
           cat and dare_linear (it needs a real-size bf16 UNet: ~11 GB peak). For the SVD forms
           (about 9 minutes each in full) it merges one module of each distinct shape on a model
           made of just those layers, and its total is EXTRAPOLATED from those per-module times by
           shape counts: printed as "est.", with no peak RSS.
  --full   the guide runs every method on the full UNet (svd alone ~9 minutes and ~18 GB).

``--arch flux``: the same on the real Flux transformer's shapes (FLUX.1 dev's config on the meta
device: 418 modules, every attention and MLP linear of the 19 double-stream and 38 single-stream
blocks; `common.flux_targets`). The transformer is 11.9B parameters, 22 GiB in bf16: the guide's
deep copy of it alone does not fit next to the base in 24 GiB, so without --quick the guide runs
every method on one module per shape (4 shapes) and its merge time is EXTRAPOLATED by shape
counts; its peak is given as a floor (base + deep copy, 2 x 22.2 GiB), not measured. --quick: the
real block structure at a tiny width (2 heads of 16), everything in full.

Both sides run with 1 torch thread unless --threads says otherwise: on a shared 2-core machine,
2 threads made small ops stall (up to 100x) and both sides 3-10x slower, so ratios wandered.

Each (side, method) runs in its own subprocess. Peak RSS is the peak during the measured step
(the kernel's peak mark is reset just before it), shown with its rise above the RSS at that point:
inputs loaded, and for the guide the base UNet built (a user has it loaded anyway). DARE is random: ours is timed with its seeded generator, and compared
with the guide by re-running it in peft-compatible mode (``seed=None``) from the global RNG state
the guide had at its first draw, with the factors in the guide's adapter dtype (peft keeps fp32
adapters on a bf16 model). The guide's merged adapter is stored in the model dtype (bf16), ours
in fp32: that rounding is most of the difference for cat and dare_linear.

The pruning SVD forms (ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd) also run ours
a second time as "before", in its own process in the same run: with ``--before DIR``, the previous
version of the package found there; otherwise this version with the solver used before
(`lora.merge_svd.top_svd`, block subspace iteration with a stopping heuristic), the solver alone.
``--no-before`` skips that side (at Flux shapes ours takes about 10 minutes for ties_svd, and a
second run would only time the solver's history). Each side reports its error against the guide
per module, and ours the certified per-module bound of the randomized SVD (its
largest, and how many modules fell back to the exact SVD).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# The real SDXL UNet config, written out once in bench_lora_loading (no download).
from bench_lora_loading import UNET_SDXL as SDXL_UNET  # noqa: E402
from common import FLUX_DEV, FLUX_QUICK, flux_targets, flux_transformer, is_flux  # noqa: E402

QUICK_UNET = SDXL_UNET | {
    "sample_size": 32,
    "block_out_channels": [64, 128, 256],
    "transformer_layers_per_block": [1, 1, 1],
    "cross_attention_dim": 256,
    "attention_head_dim": [2, 4, 8],
    "addition_time_embed_dim": 32,
    "projection_class_embeddings_input_dim": 6 * 32 + 64,
}
TARGET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
METHODS = ("svd", "ties_svd", "dare_linear", "cat")
PRUNED_SVD_METHODS = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
"""peft's pruning SVD forms: the full delta is full rank; ours also runs with the previous solver."""
WEIGHTS = (1.0, 0.8)
ALPHAS = (16.0, 32.0)
DENSITY = 0.5
SEED = 0
GUIDE_FULL_SVD_GB = 18.0  # the guide's svd peak at SDXL size, measured once with --full; its other SVD forms keep the same Vh views
GUIDE_FULL_GB = 11.5  # cat and dare_linear, measured here


# ------------------------------------------------------------------------------------ helpers


def peak_rss_mb() -> float:
    """This process's peak resident set size since start (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (Linux: "5" > /proc/self/clear_refs); return the current RSS in MB.

    ru_maxrss cannot be reset, and imports alone can set it above anything the merge adds; with
    the mark reset, VmHWM afterwards is the peak of the measured step itself.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mb("VmRSS") or peak_rss_mb()


def step_peak_mb() -> float:
    """Peak RSS since `reset_peak` (falls back to the process peak where VmHWM is unavailable)."""
    return _status_mb("VmHWM") or peak_rss_mb()


def available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return math.inf


def build_unet(config: dict, device: str):
    """The UNet (or Flux transformer) of `config`: on the meta device (shapes only), or on the CPU
    in bf16, zero weights.

    The base weights play no part in a LoRA merge, so they are allocated uninitialised and zeroed
    rather than drawn at random (seconds instead of a minute at SDXL size).
    """
    from diffusers import UNet2DConditionModel

    if is_flux(config):
        return flux_transformer(config, device)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    if device == "meta":
        return unet
    unet = unet.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for t in list(unet.parameters()) + list(unet.buffers()):
            t.zero_()
    return unet


def targets_of(config: dict) -> list[tuple[str, int, int]]:
    """(module path, out, in) of every LoRA target, in the model's module order (peft's merge order)."""
    if is_flux(config):
        return flux_targets(config)
    unet = build_unet(config, "meta")
    return [
        (name, m.out_features, m.in_features)
        for name, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and "attentions" in name and name.endswith(TARGET_SUFFIXES)
    ]


def one_per_shape(targets: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    seen, picked = set(), []
    for path, out, inp in targets:
        if (out, inp) not in seen:
            seen.add((out, inp))
            picked.append((path, out, inp))
    return picked


def write_loras(targets, rank: int, workdir: Path) -> list[Path]:
    """Two random LoRAs (bf16) over `targets`, as safetensors with keys ``<path>.down`` / ``.up``."""
    from safetensors.torch import save_file

    paths = []
    for k, alpha in enumerate(ALPHAS):
        gen = torch.Generator().manual_seed(100 + k)
        tensors = {}
        for path, out, inp in targets:
            tensors[f"{path}.down"] = (torch.randn(rank, inp, generator=gen) / math.sqrt(inp)).bfloat16()
            tensors[f"{path}.up"] = (torch.randn(out, rank, generator=gen) / math.sqrt(rank)).bfloat16()
        p = workdir / f"lora_{k}.safetensors"
        save_file(tensors, str(p), metadata={"alpha": str(alpha), "rank": str(rank)})
        paths.append(p)
    return paths


def read_loras(workdir: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(str(workdir / f"lora_{k}.safetensors")) for k in range(len(ALPHAS))]


def save_merged(path: Path, merged: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for p, (down, up) in merged.items():
        tensors[f"{p}.down"] = down.float().contiguous()
        tensors[f"{p}.up"] = up.float().contiguous()
    save_file(tensors, str(path))


# ------------------------------------------------------------------------------------ workers


def ours_worker(spec: dict) -> dict:
    """Time `merge_loras` on every module; for DARE also a peft-compatible run for the comparison.

    ``spec["reference"]``: the pruning SVD forms run the previous solver (`top_svd`)."""
    import functools

    from loraloom.lora import merge as merge_driver
    from loraloom.lora import merge_svd
    from loraloom.lora.merge import Factors, MergeOptions, merge_loras

    if spec.get("reference"):
        merge_driver.full_delta_svd = functools.partial(merge_svd.full_delta_svd, reference=True)

    workdir = Path(spec["workdir"])
    loras = read_loras(workdir)
    rank = spec["rank"]
    modules = {
        path: [Factors(lora[f"{path}.down"], lora[f"{path}.up"], alpha / rank) for lora, alpha in zip(loras, ALPHAS)]
        for path in spec["paths"]
    }
    baseline = reset_peak()
    times = []
    for _ in range(spec["repeat"]):
        start = time.perf_counter()
        result = merge_loras(spec["method"], modules, list(WEIGHTS), MergeOptions(density=DENSITY, seed=SEED))
        times.append(time.perf_counter() - start)
    peak = step_peak_mb()
    compared = spec["compare_paths"]
    merged = {p: (result.modules[p].down, result.modules[p].up) for p in compared}
    bounds = {p: getattr(result.modules[p].report, "svd_bound", None) for p in compared}
    state_file = workdir / f"rng_{spec['method']}.pt"
    if spec["method"].startswith("dare") and state_file.exists():
        dtype = getattr(torch, spec["guide_adapter_dtype"])
        compat = {p: [Factors(f.down.to(dtype), f.up.to(dtype), f.scale) for f in modules[p]] for p in compared}
        torch.set_rng_state(torch.load(state_file))
        again = merge_loras(spec["method"], compat, list(WEIGHTS), MergeOptions(density=DENSITY, seed=None))
        merged = {p: (again.modules[p].down, again.modules[p].up) for p in compared}
        bounds = {p: getattr(again.modules[p].report, "svd_bound", None) for p in compared}
    save_merged(workdir / f"{spec['side']}_{spec['method']}.safetensors", merged)
    components = {c: {"rel_error": r.rel_error, "median": r.median_rel_error, "max": r.max_rel_error,
                      "energy_kept": r.energy_kept, "max_svd_bound": getattr(r, "max_svd_bound", None),
                      "svd_fallbacks": getattr(r, "svd_fallbacks", 0)} for c, r in result.report.components.items()}
    solvers: dict[str, int] = {}
    for r in result.report.modules:
        solvers[str(r.solver)] = solvers.get(str(r.solver), 0) + 1
    return {"merge_s": min(times), "merge_runs_s": times, "prep_s": 0.0, "peak_mb": peak, "baseline_mb": baseline,
            "modules": len(modules), "components": components, "solvers": solvers, "compared_bounds": bounds}


def guide_worker(spec: dict) -> dict:
    """The guide's flow on the full UNet, or on a model of one layer per shape (`spec["subset"]`)."""
    import peft.utils.merge_utils as merge_utils
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.model import LoraModel

    workdir = Path(spec["workdir"])
    method, rank = spec["method"], spec["rank"]
    shapes = {p: (o, i) for p, o, i in spec["targets"]}
    if spec["subset"]:
        layers = torch.nn.ModuleDict({f"m{k}": torch.nn.Linear(shapes[p][1], shapes[p][0], dtype=torch.bfloat16)
                                      for k, p in enumerate(spec["paths"])})
        base = torch.nn.Module()
        base.layers = layers
        names = {p: f"layers.m{k}" for k, p in enumerate(spec["paths"])}
    else:
        base = build_unet(spec["config"], "cpu")
        names = {p: p for p in spec["paths"]}
    loras = read_loras(workdir)
    baseline = reset_peak()

    start = time.perf_counter()
    model = copy.deepcopy(base)
    configs = [LoraConfig(r=rank, lora_alpha=a, target_modules=list(names.values())) for a in ALPHAS]
    # Not "a"/"b": peft warns about adapter names that are substrings of its "lora_" prefix.
    model = get_peft_model(model, configs[0], adapter_name="one")
    model.add_adapter("two", configs[1])
    with torch.no_grad():
        for path, name in names.items():
            layer = model.base_model.model.get_submodule(name)
            for adapter, lora in zip(("one", "two"), loras):
                layer.lora_A[adapter].weight.copy_(lora[f"{path}.down"])
                layer.lora_B[adapter].weight.copy_(lora[f"{path}.up"])
    prep = time.perf_counter() - start

    per_module: list[tuple[tuple[int, int], float]] = []
    captured: list[torch.Tensor] = []
    original_prune = merge_utils.random_pruning

    def spy(tensor, density, rescale):
        if not captured:
            captured.append(torch.get_rng_state())
        return original_prune(tensor, density, rescale)

    def timed(name):
        original = getattr(LoraModel, name)

        def wrapper(self, *args, **kwargs):
            target = args[4] if name.startswith("_svd") else args[3]
            t0 = time.perf_counter()
            out = original(self, *args, **kwargs)
            per_module.append((tuple(target.weight.shape), time.perf_counter() - t0))
            return out

        setattr(LoraModel, name, wrapper)

    merge_utils.random_pruning = spy
    timed("_svd_generalized_task_arithmetic_weighted_adapter")
    timed("_generalized_task_arithmetic_weighted_adapter")
    times = []
    for run in range(spec["repeat"]):
        if run == 1:
            peak = step_peak_mb()  # the first run's peak: later runs add adapters the guide would not have
        per_module.clear()
        start = time.perf_counter()
        model.add_weighted_adapter(["one", "two"], list(WEIGHTS), f"merged{run}", combination_type=method,
                                   density=DENSITY)
        times.append(time.perf_counter() - start)
    if spec["repeat"] == 1:
        peak = step_peak_mb()
    if captured:
        torch.save(captured[0], workdir / f"rng_{method}.pt")
    merged, dtype = {}, None
    for path, name in names.items():
        layer = model.base_model.model.get_submodule(name)
        merged[path] = (layer.lora_A["merged0"].weight.detach(), layer.lora_B["merged0"].weight.detach())
        dtype = str(layer.lora_A["one"].weight.dtype).replace("torch.", "")
    save_merged(workdir / f"guide_{method}.safetensors", merged)
    by_shape: dict[str, list[float]] = {}
    for shape, t in per_module:
        by_shape.setdefault(f"{shape[0]}x{shape[1]}", []).append(t)
    return {"merge_s": min(times), "merge_runs_s": times, "prep_s": prep, "peak_mb": peak, "baseline_mb": baseline, "modules": len(names),
            "per_shape_s": {k: statistics.mean(v) for k, v in by_shape.items()}, "adapter_dtype": dtype,
            "merged_dtype": str(merged[next(iter(merged))][0].dtype).replace("torch.", "")}


def run_worker(spec: dict) -> dict:
    """Run one side in a fresh interpreter (clean peak RSS) and return its JSON result."""
    spec_file = Path(spec["workdir"]) / f"spec_{spec['side']}_{spec['method']}.json"
    spec_file.write_text(json.dumps(spec))  # 722 module shapes are too long for a command line
    env = None
    if spec.get("python_path"):  # the "before" side from another checkout of the package
        env = os.environ | {"PYTHONPATH": spec["python_path"]}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_file)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['side']} worker for {spec['method']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ comparison


def compare(workdir: Path, method: str, paths: list[str], rank: int, side: str = "ours") -> dict:
    """Per module: ours vs guide (relative difference of the merged deltas) and the guide's distance
    from the exact weighted sum; all from small Gram matrices (`lowrank_distance`). `side` names
    our output file (``ours``, or ``before`` for the previous solver)."""
    from safetensors import safe_open

    from loraloom.lora.merge import lowrank_distance

    loras = read_loras(workdir)
    diffs, guide_errors, our_errors = [], [], []
    with safe_open(str(workdir / f"{side}_{method}.safetensors"), "pt") as ours, \
            safe_open(str(workdir / f"guide_{method}.safetensors"), "pt") as guide:
        for p in paths:
            g_down, g_up = guide.get_tensor(f"{p}.down"), guide.get_tensor(f"{p}.up")
            o_down, o_up = ours.get_tensor(f"{p}.down"), ours.get_tensor(f"{p}.up")
            norm, diff = lowrank_distance([g_up], [g_down], [1.0], o_up, o_down)
            diffs.append(diff / norm if norm else 0.0)
            ups = [lora[f"{p}.up"].float() for lora in loras]
            downs = [lora[f"{p}.down"].float() for lora in loras]
            coeffs = [w * a / rank for w, a in zip(WEIGHTS, ALPHAS)]
            t_norm, error = lowrank_distance(ups, downs, coeffs, g_up, g_down)
            guide_errors.append(error / t_norm if t_norm else 0.0)
            t_norm, error = lowrank_distance(ups, downs, coeffs, o_up, o_down)
            our_errors.append(error / t_norm if t_norm else 0.0)
    return {"max_diff": max(diffs), "median_diff": statistics.median(diffs), "compared": len(diffs),
            "per_module_diff": dict(zip(paths, diffs)),
            "guide_rel_error_median": statistics.median(guide_errors), "guide_rel_error_max": max(guide_errors),
            "ours_rel_error_median": statistics.median(our_errors), "ours_rel_error_max": max(our_errors)}


def extrapolate(guide: dict, subset, targets) -> float:
    """The guide's merge time on `targets` from its run on `subset`: by its per-module time per shape;
    where it merges without a per-module call (cat concatenates the factors inline), its subset time
    scaled by the factors' size (cat's cost is a copy of them)."""
    per_shape = guide["per_shape_s"]
    if all(f"{o}x{i}" in per_shape for _, o, i in targets):
        return sum(per_shape[f"{o}x{i}"] for _, o, i in targets)
    return guide["merge_s"] * sum(o + i for _, o, i in targets) / sum(o + i for _, o, i in subset)


# ------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small UNet, everything in full (CI)")
    mode.add_argument("--full", action="store_true", help="the guide's SVD forms on the full SDXL UNet too (slow)")
    ap.add_argument("--arch", choices=("sdxl", "flux"), default="sdxl",
                    help="the model's shapes: SDXL's UNet or FLUX.1 dev's transformer (default: %(default)s)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in both sides' workers; 0: torch's own choice (default: %(default)s). "
                         "On a shared 2-core machine more threads stalled small ops up to 100x and made both "
                         "sides 3-10x slower, so 1 gives the steadier ratios")
    ap.add_argument("--repeat", type=int, help="merge runs per side, the fastest is shown (default: 3 with "
                    "--quick, else 1); the first run's captured RNG state and output are the ones compared")
    before = ap.add_mutually_exclusive_group()
    before.add_argument("--no-before", action="store_true", help="the pruning SVD forms run ours once, without the "
                        "'before' side (the certified bound is still reported)")
    before.add_argument("--before", metavar="DIR", help="a folder holding a previous version of the package as "
                    "loraloom/ (e.g. `git archive REV` unpacked into DIR/loraloom): the pruning SVD forms' "
                    "'before' side runs that version, in the same run; default: this version with the previous "
                    "solver (top_svd)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        out = guide_worker(spec) if spec["side"] == "guide" else ours_worker(spec)
        print(json.dumps(out))
        return 0

    from loraloom.lora.merge import PEFT_METHODS, SVD_METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PEFT_METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; valid (peft's, the guide's side needs them): {', '.join(PEFT_METHODS)}")
    flux = args.arch == "flux"
    if flux and args.full:
        ap.error("--full --arch flux: the guide's flow on the full Flux transformer needs over 44 GiB (base + deep "
                 "copy); without --full it runs on one module per shape and is extrapolated")
    configs = {"sdxl": (QUICK_UNET, SDXL_UNET), "flux": (FLUX_QUICK, FLUX_DEV)}[args.arch]
    config, rank = (configs[0], 16) if args.quick else (configs[1], 32)
    repeat = args.repeat or (3 if args.quick else 1)
    threads = args.threads
    label = "quick" if args.quick else ("full" if args.full else "default")
    targets = targets_of(config)
    subset = one_per_shape(targets)
    floor_mb = None
    if flux and label == "default":  # the guide deep-copies the base it holds: two bf16 transformers at least
        floor_mb = 2 * 2 * sum(p.numel() for p in build_unet(config, "meta").parameters()) / 2**20
    print(f"merge bench ({label}, {args.arch}): {len(targets)} modules, {len(subset)} shapes, ranks {rank}+{rank}, bf16 inputs, "
          f"weights {WEIGHTS}, alphas {ALPHAS}, density {DENSITY}; torch threads {threads or torch.get_num_threads()}, "
          f"fastest of {repeat} run(s); load average {os.getloadavg()[0]:.1f}", flush=True)
    cores = os.cpu_count() or 1
    if os.getloadavg()[0] >= cores and threads != 1:
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {cores} cores: multi-threaded timings stall "
              "on a busy machine; --threads 1 gives steadier ratios", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        workdir = Path(tmp)
        write_loras(targets, rank, workdir)
        all_paths = [p for p, _, _ in targets]
        for method in methods:
            # Flux: the full transformer does not fit twice in memory, so every method is extrapolated
            extrapolated = label == "default" and (flux or method in SVD_METHODS)
            guide_targets = subset if extrapolated else targets
            guide_paths = [p for p, _, _ in guide_targets]
            need = 0.0 if extrapolated or label == "quick" else (
                GUIDE_FULL_SVD_GB if method in SVD_METHODS else GUIDE_FULL_GB)
            if need > available_gb():
                print(f"{method}: skipped, the guide needs ~{need:.0f} GB and {available_gb():.1f} GB are available",
                      flush=True)
                continue
            common = {"method": method, "workdir": tmp, "rank": rank, "config": config,
                      "targets": guide_targets, "threads": threads, "repeat": repeat}
            guide = run_worker(common | {"side": "guide", "paths": guide_paths, "subset": extrapolated})
            ours = run_worker(common | {"side": "ours", "paths": all_paths, "compare_paths": guide_paths,
                                        "guide_adapter_dtype": guide["adapter_dtype"]})
            diff = compare(workdir, method, guide_paths, rank)
            if extrapolated:
                guide["merge_est_s"] = extrapolate(guide, guide_targets, targets)
            row = {"method": method, "ours": ours, "guide": guide, "diff": diff, "extrapolated": extrapolated,
                   "pruned_svd": method in PRUNED_SVD_METHODS}
            if method in PRUNED_SVD_METHODS and not args.no_before:
                row["before"] = run_worker(common | {"side": "before", "paths": all_paths, "compare_paths": guide_paths,
                                                     "guide_adapter_dtype": guide["adapter_dtype"],
                                                     "reference": not args.before,
                                                     "python_path": str(Path(args.before).resolve()) if args.before
                                                     else None})
                row["before_label"] = f"version in {args.before}" if args.before else "previous solver"
                row["before_diff"] = compare(workdir, method, guide_paths, rank, side="before")
            rows.append(row)
            print_row(row, len(targets))
            if floor_mb:
                print(f"  guide peak RSS: at least {floor_mb / 1024:.1f} GiB (the base + its deep copy, not run); ours "
                      f"{ours['peak_mb'] / 1024:.2f} GiB = {ours['peak_mb'] / floor_mb:.3f}x that floor", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": label, "arch": args.arch, "modules": len(targets),
                                                   "guide_peak_floor_mb": floor_mb, "rows": rows}, indent=1))
    return 0


def print_row(row: dict, n_modules: int) -> None:
    o, g, d = row["ours"], row["guide"], row["diff"]
    comp = next(iter(o["components"].values()))
    guide_merge = g.get("merge_est_s", g["merge_s"])
    est = "est. " if row["extrapolated"] else ""
    print(f"\n{row['method']}")
    print(f"  ours : {o['modules']} modules, merge {o['merge_s']:.2f} s, peak RSS {o['peak_mb']:.0f} MB "
          f"(+{o['peak_mb'] - o['baseline_mb']:.0f} over inputs loaded); relative error vs exact sum: median "
          f"{comp['median']:.3g}, max {comp['max']:.3g}"
          + (f"; SVD energy kept {comp['energy_kept']:.4f}" if comp["energy_kept"] is not None else ""))
    if row["extrapolated"]:
        print(f"  guide: {g['modules']} of {n_modules} modules measured (one per shape), merge {g['merge_s']:.2f} s; "
              f"EXTRAPOLATED by shape counts to {n_modules} modules: {guide_merge:.0f} s; peak RSS not measured")
    else:
        print(f"  guide: {g['modules']} modules, prep (deepcopy + get_peft_model + load) {g['prep_s']:.2f} s, merge "
              f"{g['merge_s']:.2f} s, peak RSS {g['peak_mb']:.0f} MB (+{g['peak_mb'] - g['baseline_mb']:.0f} over "
              f"base UNet + inputs)")
    print(f"         its relative error vs exact sum: median {d['guide_rel_error_median']:.3g}, max "
          f"{d['guide_rel_error_max']:.3g} (adapters {g['adapter_dtype']}, merged adapter stored in "
          f"{g['merged_dtype']}); ours on the same {d['compared']} modules: median {d['ours_rel_error_median']:.3g}, "
          f"max {d['ours_rel_error_max']:.3g}")
    ratio = (guide_merge + g["prep_s"]) / o["merge_s"] if o["merge_s"] else math.inf
    ratio_merge = guide_merge / o["merge_s"] if o["merge_s"] else math.inf
    print(f"  ratio guide/ours: merge {est}{ratio_merge:.1f}x, prep + merge {est}{ratio:.1f}x"
          + ("" if row["extrapolated"] else f", peak RSS rise {(g['peak_mb'] - g['baseline_mb']) / max(o['peak_mb'] - o['baseline_mb'], 1):.1f}x"))
    print(f"  ours vs guide, merged delta per module (relative): max {d['max_diff']:.2e}, median "
          f"{d['median_diff']:.2e} over {d['compared']} modules", flush=True)
    bound = comp.get("max_svd_bound")
    if row["pruned_svd"]:
        print(f"  certified bound vs the exact rank-k SVD: max {'- (every SVD exact)' if bound is None else f'{bound:.2e}'}"
              f" over {o['modules']} modules, {comp.get('svd_fallbacks', 0)} fell back to the exact SVD; solvers used "
              f"{o['solvers']}")
    if "before" in row:
        b, bd = row["before"], row["before_diff"]
        print(f"  before ({row['before_label']}) {b['merge_s']:.2f} s -> after {o['merge_s']:.2f} s: "
              f"{b['merge_s'] / o['merge_s']:.2f}x faster (before's solvers: {b['solvers']})")
        print(f"  before vs guide per module: max {bd['max_diff']:.2e}, median {bd['median_diff']:.2e}")
    if row["pruned_svd"]:
        for p, diff in list(d["per_module_diff"].items()) * (d["compared"] <= 16):
            bnd = o["compared_bounds"].get(p)
            before = f", before vs guide {row['before_diff']['per_module_diff'][p]:.2e}" if "before" in row else ""
            print(f"    {p}: ours vs guide {diff:.2e} (bound {'exact SVD' if bnd is None else f'{bnd:.2e}'}){before}",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
