"""What the strict checks on a base checkpoint cost: ``check_weights`` (lora/safefile's ``scan_file``
over the whole file: header, limits, every value finite) against loading the same weights with
safetensors, which loading a base pays anyway; and the content fingerprint every base is identified
by.

The checkpoint is synthetic: the real SDXL UNet's parameters (config from bench_lora_loading.py,
built on the meta device), in order, as fp16 tensors of random values, until the size is reached:
about 3 GiB (full; less when the machine's free memory or disk is short) or 64 MiB (``--quick``).
Times are taken side by side, interleaved (each round in a rotated order), warm page cache, median
of the rounds:

- load: safetensors ``load_file`` of every tensor, then a copy of each into memory of its own (what
  ``from_single_file`` does with each weight as it fills the model);
- check: ``scan_file(path, CHECKPOINT, CHECKPOINT_LIMITS)``, what ``check_weights`` runs once per
  file state;
- fingerprint: the SHA-256 content hash of the file (``file_fingerprint`` without its memo).

Peak RSS is measured for each in a fresh subprocess (the peak, reset after imports, minus the RSS
then): the check reads in slices into one 64 MiB buffer, so it should stay near that whatever the
file's size.

    python bench/bench_base_checks.py [--quick] [--size-gib 3] [--threads 1] [--json OUT]

Prints ratios measured side by side; no assertions on timings.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, reset_peak, setup_threads, status_kb, write_json

TASKS = ("load", "check", "fingerprint")


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30


def pick_size(wanted: int, folder: str) -> tuple[int, str]:
    """``wanted`` bytes, or less when the machine is short: the load holds the file in memory once
    while the page cache holds it again, so at most a quarter of the available memory and of the
    free disk."""
    room = min(_mem_available() // 4, shutil.disk_usage(folder).free // 4)
    if room >= wanted:
        return wanted, ""
    return room, f" (reduced from {wanted / 2**30:.2f} GiB: {room / 2**30:.2f} GiB is a quarter of the free memory or disk)"


def sdxl_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the real SDXL UNet, in order, built on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench_lora_loading import UNET_SDXL

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_SDXL)
    return [(f"model.diffusion_model.{name}", tuple(p.shape)) for name, p in unet.named_parameters()]


def make_checkpoint(path: Path, size: int) -> dict:
    """Write SDXL UNet tensors (fp16, random finite values) until ``size`` bytes; return stats."""
    import torch

    pool = torch.randn(32 * 2**20, generator=torch.Generator().manual_seed(0)).half().numpy().tobytes()
    entries, offset = {}, 0
    for name, shape in sdxl_shapes():
        nbytes = 2 * int(torch.Size(shape).numel())
        if offset + nbytes > size and entries:
            break
        entries[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    start, at = time.perf_counter(), 0
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for info in entries.values():
            left = info["data_offsets"][1] - info["data_offsets"][0]
            while left:
                n = min(left, len(pool) - at)
                f.write(memoryview(pool)[at:at + n])
                left -= n
                at = (at + n + 4098) % (len(pool) - 4096)  # a different stretch of the pool each time, 2-byte aligned
    return {"tensors": len(entries), "file_bytes": path.stat().st_size, "write_s": time.perf_counter() - start}


def task_fn(task: str, path: Path):
    """The zero-argument function that runs one task on ``path``."""
    from safetensors.torch import load_file

    from loraloom.bases.checks import CHECKPOINT, CHECKPOINT_LIMITS
    from loraloom.graph_runtime.cache import _hash_open_file
    from loraloom.graph_runtime.files import open_regular
    from loraloom.lora.safefile import scan_file

    def load():
        tensors = load_file(str(path))
        for key in list(tensors):
            tensors.pop(key).clone()

    def check():
        scan_file(path, CHECKPOINT, CHECKPOINT_LIMITS)

    def fingerprint():
        with open_regular(path) as (f, state):
            if _hash_open_file(f, state) is None:
                raise RuntimeError(f"{path} changed while it was hashed")

    return {"load": load, "check": check, "fingerprint": fingerprint}[task]


def measure_peak(task: str, path: Path) -> dict:
    """Run one task in this process (a fresh subprocess): its time and peak RSS over the baseline."""
    fn = task_fn(task, path)
    import safetensors.torch  # noqa: F401  (imports before the baseline, so only the task's memory counts)
    import torch  # noqa: F401

    reset = reset_peak()
    base = status_kb("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"task": task, "seconds": seconds, "peak_rss_mib": max(0, peak - base) / 1024}


def _peak_in_subprocess(task: str, path: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--measure", task, str(path)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI mode: a 64 MiB checkpoint")
    parser.add_argument("--size-gib", type=float, default=None,
                        help="checkpoint size (default: 3, or 0.0625 with --quick; less if memory or disk is short)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: %(default)s; 0: torch's own choice)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--measure", nargs=2, metavar=("TASK", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    if args.measure:
        print(json.dumps(measure_peak(args.measure[0], Path(args.measure[1]))))
        return {}
    repeats = args.repeats
    wanted = int((args.size_gib or (1 / 16 if args.quick else 3.0)) * 2**30)
    with tempfile.TemporaryDirectory(prefix="loraloom_bench_checks_") as tmp:
        path = Path(tmp) / "sdxl-unet-fp16.safetensors"
        size, note = pick_size(wanted, tmp)
        stats = make_checkpoint(path, size)
        gib = stats["file_bytes"] / 2**30
        print(f"checkpoint: {stats['tensors']} SDXL UNet tensors, fp16, {gib:.2f} GiB{note} "
              f"(written in {stats['write_s']:.1f} s); {repeats} interleaved rounds, warm page cache, "
              f"torch threads {threads}, load average {os.getloadavg()[0]:.1f}")
        fns = {task: task_fn(task, path) for task in TASKS}
        fns["fingerprint"]()  # the page cache warm before the first timed read
        times: dict[str, list[float]] = {task: [] for task in TASKS}
        for r in range(repeats):
            for task in TASKS[r % 3:] + TASKS[:r % 3]:
                start = time.perf_counter()
                fns[task]()
                times[task].append(time.perf_counter() - start)
        del fns
        peaks = {task: _peak_in_subprocess(task, path, args.threads) for task in TASKS}
    med = {task: statistics.median(ts) for task, ts in times.items()}
    figures = {
        "file_bytes": stats["file_bytes"], "tensors": stats["tensors"], "repeats": repeats,
        "times_s": times, "load_s": med["load"], "check_s": med["check"], "fingerprint_s": med["fingerprint"],
        "check_vs_load": med["check"] / med["load"], "fingerprint_vs_load": med["fingerprint"] / med["load"],
        "gib_per_s": {task: gib / med[task] for task in TASKS},
        "peak_rss_mib": {task: peaks[task]["peak_rss_mib"] for task in TASKS},
        "machine": machine(threads),
    }
    labels = {"load": "load (load_file + copy)", "check": "check (scan_file)", "fingerprint": "fingerprint (sha256)"}
    for task in TASKS:
        print(f"  {labels[task]:<24} {med[task]:7.3g} s  {figures['gib_per_s'][task]:5.2f} GiB/s  "
              f"peak RSS +{figures['peak_rss_mib'][task]:7.1f} MiB  (rounds: {', '.join(f'{t:.3g}' for t in times[task])})")
    print(f"  ratio check / load {figures['check_vs_load']:.2f}x, fingerprint / load {figures['fingerprint_vs_load']:.2f}x; "
          f"check peak RSS {figures['peak_rss_mib']['check'] / max(figures['peak_rss_mib']['load'], 1e-9):.3f}x the load's "
          f"({figures['peak_rss_mib']['check'] / (stats['file_bytes'] / 2**20):.3f}x the file)")
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
