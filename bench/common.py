"""Helpers shared by the benchmark rows: threads, device, timing, bytes read, a real-shape SDXL UNet
with random weights, random LoRAs on it, and loading a LoRA value through diffusers' own loader.

Nothing here downloads anything: the SDXL UNet config is the one written out in
``bench_lora_loading.py`` (from stabilityai/stable-diffusion-xl-base-1.0), built on the meta device.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEMO_LORAS = REPO / "workflows" / "loras"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet() -> None:
    """Silence library chatter that would bury the figures (diffusers' dtype-cast notice, peft's
    "multiple adapters" warning, transformers' load reports)."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


# LoRA targets on the UNet: attention, feed-forward, transformer in/out projections and resnet convs.
UNET_TARGETS = re.compile(
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out"
    r"|resnets\.\d+\.(conv1|conv2|conv_shortcut))$"
)


def add_common_args(parser, quick_help: str) -> None:
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: %(default)s; 0: torch's own choice). On a shared 2-core "
                             "machine 1 thread gives the steadier ratios")
    parser.add_argument("--json", help="also write the figures here")


def setup_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 keeps torch's choice); return the number in use."""
    import torch

    quiet()
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine(threads: int) -> dict:
    """What the figures were measured on."""
    import platform

    import torch

    info = {"cpu_cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": threads, "load_average": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sdxl_device_dtype():
    """The device and dtype for the real-shape SDXL rows: fp16 on CUDA; bf16 on a CPU (fp16
    matmuls and convolutions have no fast CPU kernels: a 640-channel 3x3 conv took 33 s in fp16
    against 0.14 s in bf16 here)."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.bfloat16


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device=None):
    """(seconds, result) of one call."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median(values) -> float:
    return statistics.median(values) if values else math.nan


def bytes_read() -> int:
    """Bytes this process has read through read() calls so far (/proc/self/io rchar; -1 off Linux).
    Memory-mapped reads are not counted."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except OSError:
        return -1


def status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB (``VmRSS``: resident now; ``VmHWM``: peak); 0 off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5); False if refused.
    Imports peak above where they settle, and ru_maxrss would count that peak as the task's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_measure(script: str, args: list[str], pythonpath: str | None = None) -> dict:
    """``script --measure ARGS`` in a fresh process (its own peak RSS, nothing cached from earlier
    tasks), on the loraloom found on ``pythonpath`` when given; returns the JSON it prints last."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, script, "--measure", *args], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_task_figures(script: str, tasks: list[tuple[str, str | None]], folder: Path, threads: int, rounds: int,
                      ours: str, references: tuple[str, ...], width: int = 12) -> dict:
    """Run a base-loading bench's ``tasks`` ((task, PYTHONPATH or None), each ``script --measure TASK
    FOLDER`` in a fresh process: seconds and peak_rss_mib) in ``rounds`` interleaved rounds; print
    the medians, a line per task, then ``ours`` against each reference as ratios. Returns
    {task: {seconds, peak_rss_mib, rounds_s}}."""
    runs: dict[str, list[dict]] = {task: [] for task, _ in tasks}
    for _ in range(rounds):
        for task, pythonpath in tasks:
            runs[task].append(run_measure(script, [task, str(folder), "--threads", str(threads)], pythonpath))
    figures = {}
    for task, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        peak = statistics.median(r["peak_rss_mib"] for r in results)
        figures[task] = {"seconds": seconds, "peak_rss_mib": peak, "rounds_s": [round(r["seconds"], 2) for r in results]}
        each = ", ".join(f"{r['seconds']:.2f}" for r in results)
        print(f"  {task:<{width}} {seconds:7.2f} s  peak RSS +{peak:8.0f} MiB  (rounds: {each} s)")
    for ref_task in references:
        ref = figures[ref_task]
        print(f"  ratio {ours} / {ref_task}: time {figures[ours]['seconds'] / ref['seconds']:.2f}x, "
              f"peak RSS {figures[ours]['peak_rss_mib'] / max(ref['peak_rss_mib'], 1e-9):.2f}x")
    return figures


def touch(tensors) -> None:
    """One pass over every byte of ``tensors``: what a first use pages in of tensors that are views of
    a memory-mapped file (diffusers' ``from_pretrained`` and ``lora_state_dict``, safetensors'
    ``load_file``), where nothing is read until then."""
    import torch

    for tensor in tensors:
        if tensor.numel():
            tensor.detach().reshape(-1).view(torch.uint8).numpy().max()


def write_json(path: str | None, figures: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(figures, indent=1, default=str))


# ------------------------------------------------------------------------- real-shape SDXL UNet

_POOL_SIZE = (1 << 24) + 4099  # one block of random numbers, reused at a different offset per tensor


def sdxl_unet(dtype, device, config: dict | None = None, seed: int = 0):
    """The real SDXL UNet (or ``config``) with random weights, built in seconds.

    Built on the meta device and allocated uninitialised; each weight is then filled from one block
    of 16M normal samples at its own offset, scaled by 1/sqrt(fan_in) (norm weights 1, biases
    0). Drawing 2.6B fresh samples would take ~25 s on this CPU; the values only need to be
    random-looking and deterministic.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from bench_lora_loading import UNET_SDXL

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(config or UNET_SDXL))
    return random_weights(unet.to(dtype).to_empty(device=device), device, seed).eval()


def random_weights(model, device, seed: int = 0):
    """Fill an uninitialised `model` (see `sdxl_unet`) with random-looking deterministic weights."""
    import torch

    pool = torch.randn(_POOL_SIZE, generator=torch.Generator().manual_seed(seed)).to(device)
    offset = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.view(-1)
            if p.ndim >= 2:
                done = 0
                scale = p[0].numel() ** -0.5
                while done < flat.numel():
                    n = min(flat.numel() - done, _POOL_SIZE - offset)
                    flat[done:done + n].copy_(pool[offset:offset + n] * scale)
                    done += n
                    offset = (offset + n) % _POOL_SIZE
                offset = (offset + 7919) % _POOL_SIZE
            elif name.endswith("weight") and "norm" in name:
                flat.fill_(1.0)
            else:
                flat.zero_()
        for b in model.buffers():
            if not torch.isfinite(b).all():
                b.zero_()
    return model


def unet_inputs(unet, latent: int, batch: int, dtype, device):
    """Random UNet inputs for one denoising step: latents, timestep, text states, SDXL's added
    conditions (when the UNet has them)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=gen).to(device, dtype)
    enc = torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen).to(device, dtype)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        text_embeds = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_embeds, generator=gen).to(device, dtype),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch).to(device, dtype),
        }
    t = torch.tensor(500, device=device)
    return lambda: unet(x, t, enc, **kwargs).sample


def denoiser_name(model) -> str:
    """The pipeline component `model` is: "transformer" for a Flux transformer, else "unet"."""
    return "transformer" if is_flux(model.config) else "unet"


def lora_targets(unet) -> dict:
    """{module path: ModuleSpec} of every `UNET_TARGETS` layer of `unet` (`FLUX_TARGETS` of a Flux
    transformer)."""
    from loraloom.lora.match import base_spec

    component = denoiser_name(unet)
    pattern = FLUX_TARGETS if component == "transformer" else UNET_TARGETS
    return {p: m for p, m in base_spec({component: unet}).components[component].items() if pattern.search(p)}


def random_lora(unet, rank: int, alpha: float, seed: int, dtype, paths=None):
    """A random rank-`rank` LoRA (canonical value, UNet only) on every `UNET_TARGETS` layer of
    `unet` (or on those of `paths`). Its delta is a few percent of the weight, like a trained LoRA's."""
    import torch

    from loraloom.lora.canonical import LoRA, LoRAModule, derived_fingerprint

    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for path, module in lora_targets(unet).items():
        if paths is not None and path not in paths:
            continue
        out, flat_in = module.shape[0], math.prod(module.shape[1:])
        down = (torch.randn(rank, flat_in, generator=gen) / flat_in**0.5).to(dtype)
        up = (torch.randn(out, rank, generator=gen) * 0.05 / rank**0.5).to(dtype)
        if module.kind == "conv2d":
            down, up = down.reshape(rank, *module.shape[1:]), up.reshape(out, rank, 1, 1)
        modules[path] = LoRAModule(down, up, alpha)
    return LoRA({denoiser_name(unet): modules}, source_format="derived",
                fingerprint=derived_fingerprint("bench-random", [], {"seed": seed, "rank": rank, "n": len(modules)}))


def load_into_diffusers(unet, lora, name: str) -> None:
    """Load a LoRA value into `unet` (or a Flux transformer) as peft adapter `name` through diffusers'
    own ``load_lora_into_unet`` / ``load_lora_into_transformer`` (what ``load_lora_weights`` calls),
    alpha carried in the metadata."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    from loraloom.bases.adapters import peft_inputs

    component = denoiser_name(unet)
    tensors, metadata = peft_inputs(lora, {component: unet})
    device = next(unet.parameters()).device
    tensors = {k: v.to(device) for k, v in tensors.items()}
    if component == "transformer":
        FluxPipeline.load_lora_into_transformer(tensors, None, unet, adapter_name=name, metadata=metadata,
                                                low_cpu_mem_usage=True)
        return
    StableDiffusionXLPipeline.load_lora_into_unet(tensors, None, unet, adapter_name=name, metadata=metadata,
                                                  low_cpu_mem_usage=True)


class UNetOnly:
    """A pipeline stand-in holding only a UNet (or a Flux transformer), for the model pool (which
    patches ``pipe.unet`` / ``pipe.transformer``)."""

    def __init__(self, unet):
        setattr(self, denoiser_name(unet), unet)


def pool_for(unet, label: str):
    """A ModelPool whose only base is `unet` (no loading); returns (pool, base handle)."""
    from loraloom.bases.loading import BaseIdentity, LoadedBase
    from loraloom.bases.pool import ModelPool

    param = next(unet.parameters())
    arch = "flux" if denoiser_name(unet) == "transformer" else "sdxl"

    def identify(source, dtype=None, device=None, config=None):
        return BaseIdentity(label, "bench", arch, param.dtype, param.device, f"bench:{label}")

    def loader(source, dtype=None, device=None, config=None):
        return LoadedBase(UNetOnly(unet), arch, param.dtype, param.device, f"bench:{label}", label)

    pool = ModelPool(loader=loader, identify=identify)
    return pool, pool.load(label)


# ------------------------------------------------------------------------- real-shape Flux transformer

# FluxTransformer2DModel's config of FLUX.1 [dev] (black-forest-labs/FLUX.1-dev, transformer/config.json;
# written out here, no download): 24 heads of 128 = 3072 wide, 19 double-stream and 38 single-stream
# blocks, MLP ratio 4 (12288), T5 4096 -> context, CLIP-L pooled 768, distilled guidance.
FLUX_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# The same block structure at a tiny width (2 heads of 16): the --quick shape set.
FLUX_QUICK = FLUX_DEV | {"attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 64,
                         "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]}

# LoRA targets on the Flux transformer: every attention and MLP linear of the blocks. Double blocks:
# to_q/k/v, to_out.0 (image stream), add_q/k/v_proj, to_add_out (text stream), ff and ff_context
# (3072 -> 12288 -> 3072). Single blocks: to_q/k/v, proj_mlp (3072 -> 12288), proj_out
# (attention + MLP concatenated, 15360 -> 3072). The adaLN modulation linears (norm*.linear) are not.
FLUX_TARGETS = re.compile(
    r"^(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))$"
)


def is_flux(config: dict) -> bool:
    """Whether a model config is a Flux transformer's (it has single-stream blocks)."""
    return "num_single_layers" in config


def flux_transformer(config: dict | None = None, device: str = "meta", dtype=None, seed: int | None = None):
    """FluxTransformer2DModel of `config` (default: FLUX.1 dev's real sizes): on the meta device
    (shapes only), or allocated uninitialised on `device` in `dtype` and zeroed (the base weights
    play no part in a LoRA merge or a read), or filled by `random_weights` given a `seed`."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**(config or FLUX_DEV))
    if device == "meta":
        return model
    model = model.to(dtype or torch.bfloat16).to_empty(device=device)
    if seed is not None:
        return random_weights(model, device, seed).eval()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.zero_()
    return model


def flux_targets(config: dict | None = None) -> list[tuple[str, int, int]]:
    """(module path, out, in) of every `FLUX_TARGETS` linear of the Flux transformer of `config`
    (default: FLUX.1 dev), in module order; read from the model built on the meta device."""
    import torch

    return [(name, m.out_features, m.in_features) for name, m in flux_transformer(config).named_modules()
            if isinstance(m, torch.nn.Linear) and FLUX_TARGETS.search(name)]
