"""LoRA loading at real SDXL shapes: our reader + validation vs diffusers' `lora_state_dict`, and
loading into a real-size UNet through our path vs diffusers' (full mode).

The LoRA is random, rank 32, on every attention (to_q/k/v/out), feed-forward, proj_in/out and resnet
conv / time_emb_proj layer of the real SDXL UNet and on q/k/v/out/fc1/fc2 of both text encoders,
written as a kohya SGM file (what kohya-ss writes for SDXL). Shapes come from the real SDXL configs
written out below, models built on the meta device: nothing is downloaded.

Each measurement runs in a fresh subprocess, so its peak RSS (ru_maxrss minus the RSS after imports)
and bytes read (/proc/self/io rchar) are its own; tasks are interleaved over ``--rounds`` rounds and
medians reported. ``ours-parse`` hashes the file (its content fingerprint, the cache's key);
``ours-parse-known`` is the same read when the fingerprint is already known (the runtime hashed the
file for its cache key and passes the digest: ``read_lora(known_fingerprint=...)``), the part that
compares like for like with diffusers, which hashes nothing. Run: ``python
bench/bench_lora_loading.py [--quick] [--rank 32] [--rounds 5]``. ``--quick`` (CI): UNet attention
+ text encoder 1 only, no model load, one round, < 60 s. No assertions on timings: it prints
numbers and ratios.

``--arch flux``: reading a real-shape Flux LoRA in each format the fixture writers write
(`fixtures.write_dit_fixtures` on the real FLUX.1 dev transformer's modules, built on the meta
device: every block, rank ``--rank``, fp32 tensors as the writers make them): diffusers (PEFT
names, metadata), kohya, BFL / ComfyUI (fused qkv and linear1), XLabs, LyCORIS LoHa and LoKr. Per
format, ``ours-parse`` (read + check against the transformer's modules; with the file's content
hash, ``ours-parse-known`` with it already known) against diffusers' ``FluxPipeline.lora_state_dict``
(``diffusers-parse``: it returns the safetensors' memory-mapped tensors, read later, when used, or
the converted copies of the layouts it converts: kohya's lora_down / lora_up names, XLabs) and
against the same plus one pass over every returned tensor's bytes (``diffusers-touched``: what the
loader pages in; with the file converted onto diffusers' modules, the like-for-like reference of
our read). For each format the row also counts the keys lora_state_dict returned onto diffusers'
modules (``transformer.<module>.lora_A/B.weight``): the ComfyUI lora_A / lora_B layout and the
LyCORIS files come back unconverted (no converter reads them; ``load_lora_weights`` then loads
nothing from them), and for those there is no like-for-like reference. Interleaved rounds,
medians; a format diffusers cannot read is reported as its error. ``--quick``: the same blocks at a
tiny width, one round, every task in this one process (CI: it shows the row works; peak RSS is then
meaningless). ``--json OUT`` writes the figures (Flux only).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from common import FLUX_DEV, FLUX_QUICK, bytes_read, flux_transformer, reset_peak, run_measure, status_kb, touch

UNET_SDXL = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}  # fmt: skip
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
CLIP_BIG_G = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "projection_dim": 1280, "hidden_act": "gelu",
}  # fmt: skip


def _meta_models(quick: bool):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**UNET_SDXL), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
        if not quick:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G))
    return models


def _targets(spec, quick: bool):
    import re

    unet = r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$"
    if not quick:
        unet = unet[:-2] + r"|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|samplers\.0\.conv)$"
    te = r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"
    for component, modules in spec.components.items():
        pattern = re.compile(unet if component == "unet" else te)
        for path, module in modules.items():
            if pattern.search(path):
                yield component, path, module.shape


def make_file(path: Path, rank: int, quick: bool) -> dict:
    """Write the random rank-`rank` SDXL LoRA (bf16, alpha = rank / 2) as kohya SGM; return stats."""
    import torch

    from loraloom.lora.canonical import LoRA, LoRAModule
    from loraloom.lora.match import base_spec
    from loraloom.lora.writers import write_kohya

    spec = base_spec(_meta_models(quick))
    gen = torch.Generator().manual_seed(0)
    components: dict = {}
    for component, module_path, shape in _targets(spec, quick):
        flat_in = 1
        for d in shape[1:]:
            flat_in *= d
        down = (torch.randn(rank, flat_in, generator=gen) / flat_in**0.5).to(torch.bfloat16)
        up = (torch.randn(shape[0], rank, generator=gen) * 0.01).to(torch.bfloat16)
        if len(shape) == 4:
            down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
        components.setdefault(component, {})[module_path] = LoRAModule(down, up, rank / 2)
    lora = LoRA(components, source_format="derived", fingerprint="bench")
    start = time.perf_counter()
    write_kohya(lora, path, arch="sdxl")
    return {"modules": lora.n_modules, "write_s": time.perf_counter() - start, "file_bytes": path.stat().st_size}


def write_flux_files(folder: Path, rank: int, quick: bool) -> dict[str, Path]:
    """The fixture writers' Flux LoRA in every format, on every block of the real (or `quick`: tiny)
    Flux transformer, rank `rank`; {format: path}."""
    from loraloom.fixtures import write_dit_fixtures
    from loraloom.lora.match import base_spec

    spec = base_spec({"transformer": flux_transformer(FLUX_QUICK if quick else FLUX_DEV)})
    written = write_dit_fixtures(folder, spec, "flux", "flux", rank=rank, every_block=True)
    return {key.split("/", 1)[1]: path for key, path in written.items()}


def measure_flux(task: str, path: str, quick: bool) -> dict:
    """One Flux reading task (fresh subprocess): ours (read + check) or diffusers' lora_state_dict."""
    import torch  # noqa: F401  (imports before the baseline, so only the task's memory counts)
    from diffusers import FluxPipeline

    import diffusers.loaders.lora_conversion_utils  # noqa: F401  (lazy imports outside the timing)
    from loraloom.lora.match import base_spec, check_lora
    from loraloom.lora.readers import read_lora

    spec = base_spec({"transformer": flux_transformer(FLUX_QUICK if quick else FLUX_DEV)})
    known = None
    if task == "ours-parse-known":  # hashed before the baseline, as the runtime does for its cache key
        from loraloom.graph_runtime import file_fingerprint

        known = file_fingerprint(path)
    reset_peak()  # building the spec peaked above where it settles: the task's own peak from here
    base_rss, base_read = status_kb("VmRSS"), bytes_read()
    start = time.perf_counter()
    error = None
    if task.startswith("ours-parse"):
        lora = read_lora(path, known_fingerprint=known)
        check_lora(lora, spec)
        modules = lora.n_modules
    else:
        try:
            out = FluxPipeline.lora_state_dict(path)
            state = out[0] if isinstance(out, tuple) else out
            if task == "diffusers-touched":
                touch(state.values())
            modules = len(state)
        except Exception as exc:  # noqa: BLE001  (the figure is that diffusers fails, and how)
            error, modules, state = f"{type(exc).__name__}: {str(exc)[:200]}", 0, {}
    seconds = time.perf_counter() - start
    peak = status_kb("VmHWM")
    converted = None if task.startswith("ours") else sum(1 for key in state if _onto_diffusers(key, spec))
    return {"task": task, "seconds": seconds, "peak_rss_mb": max(0, peak - base_rss) / 1024,
            "bytes_read": bytes_read() - base_read, "modules": modules, "error": error,  # modules: diffusers' tensors
            "converted": converted}


def _onto_diffusers(key: str, spec) -> bool:
    """Whether a key lora_state_dict returned names a LoRA factor of a diffusers module: a transformer
    module of `spec` or a text encoder's (``text_encoder.…``), as ``load_lora_weights`` takes them."""
    component, _, rest = key.partition(".")
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if rest.endswith(suffix):
            path = rest.removesuffix(suffix)
            return component == "text_encoder" or (component == "transformer" and path in spec.components["transformer"])
    return False


def flux_main(args) -> int:
    """Every Flux format: ours-parse vs diffusers-parse, interleaved rounds, medians."""
    rounds = 1 if args.quick else args.rounds
    figures = {"arch": "flux", "rank": args.rank, "rounds": rounds, "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        files = write_flux_files(Path(tmp), args.rank, args.quick)
        print(f"Flux LoRAs ({'tiny width' if args.quick else 'FLUX.1 dev shapes'}, every block, rank {args.rank}, "
              f"fp32): {len(files)} formats written in {time.perf_counter() - start:.1f} s", flush=True)
        runs: dict = {fmt: {"ours-parse": [], "ours-parse-known": [], "diffusers-parse": [], "diffusers-touched": []}
                      for fmt in files}
        for _ in range(rounds):
            for fmt, path in files.items():
                for task in runs[fmt]:
                    # --quick (CI) runs the tasks in this process: it shows the row works, its peak RSS means nothing
                    runs[fmt][task].append(measure_flux(task, str(path), True) if args.quick else
                                           run_measure(__file__, [task, str(path), "--arch", "flux"]))
        for fmt, tasks in runs.items():
            med = {task: {key: statistics.median(r[key] for r in results) for key in ("seconds", "peak_rss_mb", "bytes_read")}
                   | {key: results[0][key] for key in ("modules", "error", "converted")} for task, results in tasks.items()}
            mib = files[fmt].stat().st_size / 2**20
            figures["formats"][fmt] = {"file_mib": mib, "tasks": med}
            print_flux_format(fmt, mib, med)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def print_flux_format(fmt: str, mib: float, med: dict) -> None:
    """One format's figures: ours, lora_state_dict as it returns, and with its tensors paged in."""
    o, k, d, t = med["ours-parse"], med["ours-parse-known"], med["diffusers-parse"], med["diffusers-touched"]
    print(f"  {fmt:<10} {mib:7.1f} MiB  ours {o['seconds']:.3f} s (fingerprint known {k['seconds']:.3f} s), "
          f"+{o['peak_rss_mb']:.0f} MiB, read {o['bytes_read'] / 2**20:.0f} MiB, {o['modules']} modules", flush=True)
    if d["error"]:
        print(f"             lora_state_dict fails: {d['error']}", flush=True)
        return
    for name, r in (("lora_state_dict", d), ("+ every byte paged in", t)):
        print(f"             {name:<22} {r['seconds']:.3f} s, +{r['peak_rss_mb']:.0f} MiB, read "
              f"{r['bytes_read'] / 2**20:.0f} MiB | ours (hash known) / it: time {k['seconds'] / r['seconds']:.2f}x, "
              f"peak RSS {k['peak_rss_mb'] / max(r['peak_rss_mb'], 1e-9):.2f}x", flush=True)
    whole = d["converted"] == d["modules"]
    print(f"             {d['converted']} of its {d['modules']} tensors name diffusers' modules: "
          + ("converted, like for like with the line above" if whole else
             "not converted, no like-for-like reference (load_lora_weights loads nothing from it)" if not d["converted"]
             else "partly converted (the rest: keys its loader skips)"), flush=True)


def measure(task: str, path: str, quick: bool) -> dict:
    """Run one task in this process (called in a fresh subprocess) and report time, RSS and bytes read."""
    import torch  # noqa: F401  (imports before the baseline, so only the task's memory counts)
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from loraloom.bases.adapters import peft_inputs
    from loraloom.lora.match import base_spec, check_lora
    from loraloom.lora.readers import read_lora

    import diffusers.loaders.lora_conversion_utils  # noqa: F401  (lazy imports of both paths, outside the timing)
    import peft.utils.other  # noqa: F401

    models = _meta_models(quick)
    spec = base_spec(models)
    if task.endswith("load"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**UNET_SDXL)
        unet = unet.to_empty(device="cpu").to(torch.bfloat16)  # real size, no init cost
    known = None
    if task == "ours-parse-known":  # hashed before the baseline, as the runtime does for its cache key
        from loraloom.graph_runtime import file_fingerprint

        known = file_fingerprint(path)
    base_rss, base_read = status_kb("VmRSS"), bytes_read()
    start = time.perf_counter()
    if task == "ours-parse":
        check_lora(read_lora(path), spec)
    elif task == "ours-parse-known":
        check_lora(read_lora(path, known_fingerprint=known), spec)
    elif task == "diffusers-parse":
        StableDiffusionXLPipeline.lora_state_dict(path, unet_config=models["unet"].config)
    elif task == "ours-load":
        lora = read_lora(path)
        unet_only = lora.replace(components={"unet": lora.components["unet"]})
        tensors, metadata = peft_inputs(unet_only, check_lora(unet_only, {"unet": unet}) and {"unet": unet})
        StableDiffusionXLPipeline.load_lora_into_unet(tensors, None, unet, adapter_name="loom", metadata=metadata, low_cpu_mem_usage=True)
    elif task == "diffusers-load":
        sd, alphas = StableDiffusionXLPipeline.lora_state_dict(path, unet_config=unet.config)
        StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name="ref", low_cpu_mem_usage=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"task": task, "seconds": seconds, "peak_rss_mb": max(0, peak - base_rss) / 1024, "bytes_read": bytes_read() - base_read}


def _run(task: str, path: Path, quick: bool, before: str | None = None) -> dict:
    """One task in a fresh process; a task ending in ``-before`` runs on the loraloom at ``before``."""
    pythonpath = before if task.endswith("-before") else None
    return run_measure(__file__, [task.removesuffix("-before"), str(path)] + (["--quick"] if quick else []), pythonpath)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: smaller LoRA, no model load")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians); --quick: 1")
    parser.add_argument("--before", metavar="PYTHONPATH", help="also run our tasks on the loraloom found on this "
                        "PYTHONPATH (another checkout, e.g. the commit before a change), side by side")
    parser.add_argument("--arch", choices=("sdxl", "flux"), default="sdxl",
                        help="SDXL (kohya SGM file) or Flux (every format) (default: %(default)s)")
    parser.add_argument("--json", help="also write the figures here (--arch flux)")
    parser.add_argument("--measure", nargs=2, metavar=("TASK", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        run = measure_flux if args.arch == "flux" else measure
        print(json.dumps(run(args.measure[0], args.measure[1], args.quick)))
        return 0
    if args.arch == "flux":
        return flux_main(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sdxl-rank.safetensors"
        stats = make_file(path, args.rank, args.quick)
        mb = stats["file_bytes"] / 2**20
        print(f"LoRA: {stats['modules']} modules, rank {args.rank}, bf16, kohya SGM, {mb:.1f} MiB (written in {stats['write_s']:.2f} s)")
        before = ("ours-parse-before",) if args.before else ()
        groups = [("ours-parse", "ours-parse-known", *before, "diffusers-parse")]
        if not args.quick:
            groups.append(("ours-load", *(("ours-load-before",) if args.before else ()), "diffusers-load"))
        rounds = 1 if args.quick else args.rounds
        for group in groups:
            runs = {task: [] for task in group}
            for _ in range(rounds):
                for task in group:
                    runs[task].append(_run(task, path, args.quick, args.before))
            med = {task: {key: statistics.median(r[key] for r in results)
                          for key in ("seconds", "peak_rss_mb", "bytes_read")} for task, results in runs.items()}
            for task in group:
                r = med[task]
                each = ", ".join(f"{x['seconds']:.3f}" for x in runs[task])
                print(
                    f"  {task:<16} {r['seconds']:7.3f} s  peak RSS +{r['peak_rss_mb']:7.1f} MiB  "
                    f"read {r['bytes_read'] / 2**20:7.1f} MiB ({r['bytes_read'] / stats['file_bytes']:.2f}x file)  "
                    f"rounds: {each}"
                )
            theirs = med[group[-1]]
            for task in group[:-1]:
                print(
                    f"  ratio {task}/diffusers: time {med[task]['seconds'] / theirs['seconds']:.2f}, "
                    f"peak RSS {med[task]['peak_rss_mb'] / max(theirs['peak_rss_mb'], 1e-9):.2f}"
                )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
