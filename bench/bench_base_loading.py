"""Loading a base at full SDXL size: ``load_base`` (what the LoadBase node runs) vs diffusers'
``StableDiffusionXLPipeline.from_pretrained``, time and peak RSS, each in a fresh process.

The diffusers folder has the real SDXL configs (UNet 2.6B parameters, both text encoders, the VAE),
fp16, random weights (a seeded random block tiled over every tensor: the values do not matter to
a load, only that they are finite), and the tiny presets' tokenizers. It is written once, to
``~/.cache/loraloom/bench-sdxl-base-fp16`` (about 6.5 GiB; ``--folder`` to move it), and reused.

References: ``diffusers``, ``from_pretrained`` alone, whose tensors are views of the mapped files
(nothing is read yet: its time and memory are what it defers); ``diffusers-touched``, the same plus
one pass over every weight's bytes, what the first sample pages in.

``load_base`` on a folder, the first time in a process: checks every config and weights header,
reads each weights file once to check every value and compute its content fingerprint (one read
for both), then lets diffusers load it and copies every weight into memory the process owns
(``_own_memory``: diffusers' tensors are views of the mapped files). ``--before PYTHONPATH`` adds
the same task run on another checkout of loraloom (e.g. the commit before a change), side by
side. Rounds are interleaved (each task once per round) and medians reported; the page cache is
warm (the folder was written or read just before), as for a base loaded again.

Run: ``python bench/bench_base_loading.py [--quick] [--rounds 2] [--json OUT]``. ``--quick`` (CI):
the tiny-sdxl preset saved as a folder instead, one round. No assertions on timings.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_loading import CLIP_BIG_G, CLIP_L, UNET_SDXL  # noqa: E402  (one copy of the SDXL shapes)
from common import load_task_figures, status_kb, touch  # noqa: E402

VAE_SDXL = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
}  # fmt: skip
DEFAULT_FOLDER = Path.home() / ".cache" / "loraloom" / "bench-sdxl-base-fp16"


def _fill(module, pool) -> None:
    """Every parameter and buffer of ``module`` from the random ``pool``, tiled (fast; finite)."""
    import torch

    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if not tensor.is_floating_point():
                continue
            flat = tensor.view(-1)
            for begin in range(0, flat.numel(), pool.numel()):
                part = flat[begin : begin + pool.numel()]
                part.copy_(pool[: part.numel()])


def write_folder(folder: Path) -> dict:
    """Write the full-size SDXL folder once (a finished folder has ``.complete``); return its size."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraloom.bases.presets import build_pipeline

    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        # The pipeline's frame (model_index.json, scheduler, tokenizers) from the tiny preset; then each
        # model written at full size, one at a time so only one is in memory.
        build_pipeline("tiny-sdxl", dtype="fp16", device="cpu").save_pretrained(folder)
        pool = (torch.randn(2**22, generator=torch.Generator().manual_seed(0)) * 0.02).half()
        makers = {
            "unet": lambda: UNet2DConditionModel(**UNET_SDXL),
            "vae": lambda: AutoencoderKL(**VAE_SDXL),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G)),
        }
        for name, make in makers.items():
            with torch.device("meta"):
                model = make()
            model = model.to_empty(device="cpu").to(torch.float16)
            _fill(model, pool)
            shutil.rmtree(folder / name)
            model.save_pretrained(folder / name, safe_serialization=True)
            del model
        (folder / ".complete").write_text(f"written in {time.perf_counter() - start:.0f} s\n")
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"bytes": sum(p.stat().st_size for p in files), "weights_bytes": sum(p.stat().st_size for p in files
                                                                                 if p.suffix == ".safetensors")}


def write_quick_folder(folder: Path) -> dict:
    from loraloom.bases.presets import build_pipeline

    build_pipeline("tiny-sdxl", dtype="fp16", device="cpu").save_pretrained(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"bytes": sum(p.stat().st_size for p in files),
            "weights_bytes": sum(p.stat().st_size for p in files if p.suffix == ".safetensors")}


def measure(task: str, folder: str, threads: int) -> dict:
    """Run one task in this process (a fresh subprocess): time and peak RSS above the imports."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from loraloom.bases.loading import load_base

    if threads > 0:
        torch.set_num_threads(threads)
    base_rss = status_kb("VmRSS")
    start = time.perf_counter()
    if task.startswith("ours"):
        loaded = load_base(folder, dtype="fp16", device="cpu")
        fingerprint = loaded.fingerprint
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float16, local_files_only=True,
                                                         use_safetensors=True)
        fingerprint = None
        if task == "diffusers-touched":  # what the first sample pages in
            for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
                touch(list(model.parameters()) + list(model.buffers()))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"task": task, "seconds": seconds, "peak_rss_mib": max(0, peak - base_rss) / 1024,
            "fingerprint": fingerprint}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: the tiny-sdxl preset as a folder, one round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="where the full-size folder is kept")
    parser.add_argument("--before", metavar="PYTHONPATH", help="also run load_base from this loraloom checkout")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each task (0: torch's default)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--measure", nargs=2, metavar=("TASK", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.threads)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny-sdxl" if args.quick else args.folder
        sizes = write_quick_folder(folder) if args.quick else write_folder(folder)
        rounds = 1 if args.quick else args.rounds
        tasks = [("ours", None), ("diffusers", None), ("diffusers-touched", None)]
        tasks += [("ours-before", args.before)] if args.before else []
        print(f"folder: {folder} ({'tiny-sdxl' if args.quick else 'SDXL, full size'}, fp16), "
              f"{sizes['weights_bytes'] / 2**30:.2f} GiB of weights; {rounds} interleaved rounds, medians")
        figures = {"weights_bytes": sizes["weights_bytes"], "rounds": rounds,
                   "tasks": load_task_figures(__file__, tasks, folder, args.threads, rounds, "ours",
                                              ("diffusers", "diffusers-touched"), width=12)}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
