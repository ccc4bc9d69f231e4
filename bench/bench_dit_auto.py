"""Loading a Flux base from the files ComfyUI users keep (config "auto": the transformer file, then
clip_l, t5xxl and ae found by name, every config derived from a header) vs the same weights as a
diffusers folder, loaded by ``load_base`` and by diffusers' ``FluxPipeline.from_pretrained``; time
and peak RSS, each in a fresh process.

The model has FLUX.1 dev's real widths with fewer blocks, so it fits this machine: the transformer
3072 wide (1 double-stream and 2 single-stream blocks of the real 19 + 38), CLIP-L at full size, a
T5 at T5-XXL's real width (4096, 64 heads, feed-forward 10240) with 2 of its 24 layers, Flux's VAE
at full size; fp16, random (a seeded random block tiled over every tensor), the tiny built-in
tokenizers. About 2.7 GB of weights, written once to ``~/.cache/loraloom/bench-flux-parts-fp16``
(``--folder`` to move it) and reused.

Tasks: ``auto`` (``load_base(transformer file)`` with the part folders: header checks, every
value checked and hashed on one read per file, configs derived, each model placed from owned
memory), ``folder`` (``load_base`` on the diffusers folder), ``diffusers`` (``from_pretrained``
alone: views of the mapped files, nothing read yet), ``diffusers-touched`` (the same plus one pass
over every weight, what the first sample pages in). Rounds are interleaved, medians reported; the
page cache is warm. ``--quick`` (CI): the small derivable Flux of ``fixtures.dit_parts_pipeline``,
one round. No assertions on timings.

Run: ``python bench/bench_dit_auto.py [--quick] [--rounds 2] [--json OUT]``.
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
from bench_base_loading import _fill  # noqa: E402  (one copy of the tiled random fill)
from bench_lora_loading import CLIP_L  # noqa: E402
from common import FLUX_DEV, load_task_figures, status_kb, touch  # noqa: E402

DEFAULT_FOLDER = Path.home() / ".cache" / "loraloom" / "bench-flux-parts-fp16"
BLOCKS = {"num_layers": 1, "num_single_layers": 2}
T5_XXL_2_LAYERS = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_heads": 64, "num_layers": 2,
                   "num_decoder_layers": 2, "relative_attention_num_buckets": 32}
VAE_FLUX = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}


def _pipeline():
    """The real-width Flux pipeline described above, fp16, filled."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from loraloom import fixtures
    from loraloom.bases.auto_config import CLIP_TOKEN_IDS
    from loraloom.bases.dit_config import T5_FAMILY, VAE_FAMILY
    from loraloom.bases.presets import SCHEDULER_FLUX, build_t5_tokenizer, build_tokenizer

    family = VAE_FAMILY["flux"]
    makers = {
        "transformer": lambda: FluxTransformer2DModel(**(FLUX_DEV | BLOCKS)),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L, vocab_size=fixtures.CLIP_VOCAB,
                                                             max_position_embeddings=77, hidden_act="quick_gelu",
                                                             projection_dim=768, **CLIP_TOKEN_IDS)),
        "text_encoder_2": lambda: T5EncoderModel(T5Config(vocab_size=fixtures.T5_VOCAB, **T5_XXL_2_LAYERS,
                                                          **T5_FAMILY)),
        "vae": lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=32,
                                     down_block_types=["DownEncoderBlock2D"] * 4,
                                     up_block_types=["UpDecoderBlock2D"] * 4, sample_size=family["vae_sample_size"],
                                     scaling_factor=family["scaling_factor"], shift_factor=family["shift_factor"],
                                     force_upcast=True, use_quant_conv=False, use_post_quant_conv=False, **VAE_FLUX),
    }
    pool = (torch.randn(2**22, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    models = {}
    for name, make in makers.items():
        with torch.device("meta"):
            model = make()
        models[name] = model.to_empty(device="cpu").to(torch.float16).eval()
        _fill(models[name], pool)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_FLUX), tokenizer=build_tokenizer(),
                        tokenizer_2=build_t5_tokenizer(512), **models)


def write(folder: Path, quick: bool) -> int:
    """The diffusers folder (``folder/diffusers``) and the ComfyUI-style files (``folder/models``) of
    one pipeline, once (a finished folder has ``.complete``); returns the bytes of weights of one copy."""
    import torch

    from loraloom import fixtures

    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        pipe = fixtures.dit_parts_pipeline("flux") if quick else _pipeline()
        if quick:
            pipe = pipe.to(dtype=torch.float16)
        pipe.save_pretrained(folder / "diffusers", safe_serialization=True)
        fixtures.write_dit_parts(folder / "models", "flux", pipe)
        (folder / ".complete").write_text(f"written in {time.perf_counter() - start:.0f} s\n")
    return sum(p.stat().st_size for p in (folder / "models").rglob("*.safetensors"))


def measure(task: str, folder: str, threads: int) -> dict:
    """Run one task in this process (a fresh subprocess): time and peak RSS above the imports."""
    import torch
    from diffusers import FluxPipeline

    from loraloom.bases.loading import load_base

    if threads > 0:
        torch.set_num_threads(threads)
    models = Path(folder) / "models"
    base_rss = status_kb("VmRSS")
    start = time.perf_counter()
    if task == "auto":
        load_base(models / "checkpoints" / "flux-parts.safetensors", dtype="fp16", device="cpu",
                  tokenizer_dirs=[models / "tokenizers" / "clip"],
                  part_dirs={"text_encoders": [models / "text_encoders"], "vae": [models / "vae"],
                             "t5_tokenizer": [models / "tokenizers" / "t5"]})
    elif task == "folder":
        load_base(Path(folder) / "diffusers", dtype="fp16", device="cpu")
    else:
        pipe = FluxPipeline.from_pretrained(Path(folder) / "diffusers", torch_dtype=torch.float16,
                                            local_files_only=True, use_safetensors=True)
        if task == "diffusers-touched":
            for model in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
                touch(list(model.parameters()) + list(model.buffers()))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"task": task, "seconds": seconds, "peak_rss_mib": max(0, peak - base_rss) / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: the small derivable Flux, one round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="where the real-width files are kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each task (0: torch's default)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--measure", nargs=2, metavar=("TASK", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.threads)))
        return 0
    tasks = ("auto", "folder", "diffusers", "diffusers-touched")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "flux-parts" if args.quick else args.folder
        weights = write(folder, args.quick)
        rounds = 1 if args.quick else args.rounds
        print(f"files: {folder} ({'small derivable Flux' if args.quick else 'Flux, real widths, 1 + 2 blocks'}, "
              f"fp16), {weights / 2**30:.2f} GiB of weights; {rounds} interleaved rounds, medians")
        figures = {"weights_bytes": weights, "rounds": rounds,
                   "tasks": load_task_figures(__file__, [(task, None) for task in tasks], folder, args.threads, rounds,
                                              "auto", ("folder", "diffusers-touched"), width=18)}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
