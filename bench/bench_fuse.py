"""Row 3, fusing: what a weight edit costs (our re-patch, before and after the one-matmul patch),
UNet step time of our fused model vs the plain base vs diffusers' unfused adapters, peak memory of
each, and how exactly the base comes back after fuse/restore cycles (ours vs diffusers' unfuse_lora).

Two scales: the tiny-sdxl preset's UNet, and the real SDXL UNet config with random weights; bf16
on a CPU (fp16 has no fast CPU kernels), fp16 on CUDA. Two random LoRAs (rank 32 alpha 16, rank 16
alpha 16, weights 1.0 and 0.8) on every attention (to_q/k/v/out), feed-forward, proj_in/out and
resnet conv layer. One step = one UNet forward, batch 2 (classifier-free guidance), at a 16x16
(tiny) or 32x32 (SDXL, 256 px) latent. ``--quick``: the tiny scale only.

Patching, one UNet, the pool's own maths against `reference_patch` (the per-delta fp32 maths the
pool used before; both read the same backups):
  first patch (it also takes the backups), each algorithm on a fresh pool;
  weight edits (LoRA 0's weight alternates 1.0 / 0.9, so every layer is rewritten) in rounds ordered
    before, after, after, before; medians, and the ratio;
  on CUDA, also with the backups in pinned host memory and in GPU memory (``LORALOOM_BACKUPS``).
Step time, side by side in rounds ordered plain, other, other, plain; medians:
  phase 1 (no peft): the plain base; our pool fuses both LoRAs and steps twice; the pool restores.
    Ratio fused / plain. Peak memory (RSS on a CPU, allocated GPU memory on CUDA) from the first
    patch to here: the blended model with its backups.
  phase 2 (same UNet, both LoRAs loaded through diffusers' own loader, set_adapters weights): steps
    with adapters disabled (the plain base behind peft's wrappers) and with both adapters active
    (unfused), and the peak memory of that. Ratio unfused / plain. Also fuse_lora, one fused step
    and unfuse_lora.
Restore: for fp16 and bf16, two LoRAs fused and restored 1 and 10 times, ours (pool) vs diffusers
(fuse_lora / unfuse_lora); max abs difference of every touched weight from a copy of the original.
On the tiny UNet they run on every target. At SDXL shapes the restore cycles run on the LoRA modules of down_blocks.1.attentions.0 (two
640-wide transformer layers, proj_in/out), down_blocks.1.resnets.0, the first 1280-wide transformer
layer of down_blocks.2 and mid_block.resnets.0 (every distinct LoRA layer kind and width), to stay
inside the time budget: the rounding error is per element, so more modules of the same shapes change
the time, not the figure. ``--restore-scope full`` runs them on every target.

Scale ``flux`` (``--scales flux``; not in the default set): the restore cycles only, in bf16, on a
Flux transformer of FLUX.1 dev's width with 2 double-stream and 2 single-stream blocks (random
weights; every attention and MLP linear of those blocks, `common.FLUX_TARGETS`: 34 modules, all
four real Flux LoRA shapes), ours vs diffusers' fuse_lora / unfuse_lora on the same transformer;
the LoRAs loaded through FluxPipeline's own loader. With ``--quick``, the same blocks at a tiny width.

    python bench/bench_fuse.py [--quick] [--scales tiny,sdxl,flux] [--threads 1] [--rounds 2] [--latent 32]
                               [--patch-only] [--edit-threads 1,2] [--gpu] [--json OUT]

``--edit-threads``: after the before/after edits, our weight edit and a sampling step side by side
at each of these torch thread counts (default: 1 and the machine's cores), so "is an edit within
one step" is answered at each thread count in one run.

``--gpu``: the GPU machine's one script: SDXL shapes on CUDA in fp16, no restore cycles.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (FLUX_DEV, FLUX_QUICK, add_common_args, flux_transformer, load_into_diffusers,  # noqa: E402
                    lora_targets, machine, median, pool_for, random_lora, reset_peak, sdxl_device_dtype, sdxl_unet,
                    setup_threads, status_kb, timed, unet_inputs, write_json)

WEIGHTS = (1.0, 0.8)
# One transformer layer and one resnet at each width (640, 1280), their attention's proj_in/out.
RESTORE_SUBSET = ("down_blocks.1.attentions.0.", "down_blocks.1.resnets.0.",
                  "down_blocks.2.attentions.0.transformer_blocks.0.", "mid_block.resnets.0.")


SCALES = {"tiny": "tiny-sdxl UNet", "sdxl": "real SDXL UNet, random weights",
          "flux": "Flux transformer, 2 double + 2 single blocks at FLUX.1 dev's width, random weights"}
FLUX_BLOCKS = {"num_layers": 2, "num_single_layers": 2}  # the restore cycles' blocks: every real Flux LoRA shape


def _config(scale: str):
    if scale == "sdxl":
        return None  # the real SDXL UNet (common.sdxl_unet's default)
    from loraloom.bases.presets import preset_configs

    return preset_configs("tiny-sdxl")["unet"]


def _recipe(handle, loras, weights):
    from loraloom.bases.pool import Application, ModelRecipe

    apps = tuple(Application(lora, f"lora{i}", w, w) for i, (lora, w) in enumerate(zip(loras, weights)))
    return ModelRecipe(handle, fused=apps)


def reference_patch(weight, source, entries) -> int:
    """The per-layer maths before the one-matmul patch (the "before" of the re-patch figures): the
    backup upcast to fp32, each module's full delta in fp32, added one by one, cast once."""
    import torch

    from loraloom.lora.canonical import delta

    new = source.to(weight.device, torch.float32, copy=True)
    deltas: dict[int, object] = {}
    for _fp, coeff, module in entries:
        d = deltas.get(id(module))
        if d is None:
            d = deltas[id(module)] = delta(module, weight.shape).to(weight.device)
        new.add_(d, alpha=coeff)
    weight.copy_(new.to(weight.dtype))
    return len(deltas)


def _use(pool, patch) -> None:
    """Make `pool` patch layers with `patch` (None: its own maths); the backups stay shared."""
    if patch is None:
        pool.__dict__.pop("patch_weight", None)
    else:
        pool.patch_weight = patch


def _peak(device) -> float:
    """MiB: peak RSS since the last `reset_peak` (CPU) or peak allocated GPU memory (CUDA)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_kb("VmHWM") / 1024


def _reset(device) -> float:
    """Start a peak-memory window; returns the memory in use now, MiB (RSS or allocated GPU memory)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    reset_peak()
    return status_kb("VmRSS") / 1024


def _editor(pool, handle, loras, device):
    """``edit(patch)``: one weight edit (every layer's coefficient changes: LoRA 0 between 1.0 and
    0.9) through `patch` (None: the pool's own maths); returns its seconds. The pool holds the first
    patch's recipe when this is made, so the first edit asks for the other."""
    edits = [_recipe(handle, loras, WEIGHTS), _recipe(handle, loras, (0.9, WEIGHTS[1]))]
    turn = iter(range(1, 10**9))

    def edit(patch=None):
        _use(pool, patch)
        recipe = edits[next(turn) % 2]
        try:
            return timed(lambda: pool.pipeline(recipe), device)[0]
        finally:
            _use(pool, None)

    return edit


def patch_times(pool, handle, edit, rounds: int, device, backups: tuple[str, ...]) -> dict:
    """Weight edits through the pool's patch and the reference maths, side by side in rounds
    ordered before, after, after, before; medians. With backups on a GPU, also one round per backup
    place."""
    before, after = [], []
    for _ in range(rounds):
        before.append(edit(reference_patch))
        after += [edit(), edit()]
        before.append(edit(reference_patch))
    out = {"reference_repatch_s": before, "ours_edit_s": after,
           "repatch_speedup": median(before) / median(after)}
    if device.type == "cuda":
        live = next(iter(pool._live.values()))
        for place in backups:  # move the backups there, then time edits reading them
            pool.backups = place
            pool.plain(handle)
            live.backups.clear()
            out[f"first_patch_{place}_s"] = edit()
            out[f"edit_{place}_s"] = median([edit() for _ in range(3)])
            out[f"backups_on_device_{place}"] = sum(b.device.type == "cuda" for b in live.backups.values())
    return out


def edit_and_step(edit, step, rounds: int, threads: int, device) -> dict:
    """Our weight edit and one sampling step at `threads` torch threads, side by side in rounds
    ordered edit, step, step, edit; medians: is an edit within one step's time?"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step()  # warm-up at this thread count (oneDNN's per-thread-count kernels, the allocator)
        edits, steps = [], []
        for _ in range(rounds):
            edits.append(edit())
            steps += [timed(step, device)[0], timed(step, device)[0]]
            edits.append(edit())
    finally:
        torch.set_num_threads(before)
    return {"edit_s": median(edits), "step_s": median(steps), "edit_vs_step": median(edits) / median(steps)}


def step_times(scale: str, latent: int, rounds: int, device, dtype, patch_only: bool = False,
               edit_threads: tuple[int, ...] = ()) -> dict:
    import torch

    unet = sdxl_unet(dtype, device, _config(scale))
    params = sum(p.numel() for p in unet.parameters())
    loras = [random_lora(unet, 32, 16.0, 1, dtype), random_lora(unet, 16, 16.0, 2, dtype)]
    step = unet_inputs(unet, latent, 2, dtype, device)
    out = {"unet_params": params, "lora_modules": loras[0].n_modules, "latent": latent, "batch": 2,
           "dtype": str(dtype).replace("torch.", ""), "device": str(device), "rounds": rounds,
           "threads": torch.get_num_threads()}
    unet_mib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
    # what diffusers' adapters hold beside the UNet: the same factors, in the model's dtype
    out["lora_mib"] = sum(lora.nbytes for lora in loras) / 2**20
    with torch.no_grad():
        if not patch_only:
            step()  # warm-up (allocator, kernels)
        for patch, name in ((reference_patch, "reference"), (None, "ours")):
            # the first patch also copies every touched weight into the backup (a fresh pool each)
            base_mib = _reset(device)
            pool, handle = pool_for(unet, f"first-{name}")
            _use(pool, patch)
            out[f"{name}_first_patch_s"] = timed(lambda: pool.pipeline(_recipe(handle, loras, WEIGHTS)), device)[0]
            _use(pool, None)
            if patch is not None:
                pool.plain(handle)
                pool = None  # drops the backups
        live = next(iter(pool._live.values()))
        out["backup_mib"] = sum(b.numel() * b.element_size() for b in live.backups.values()) / 2**20
        out["backup_dtypes"] = sorted({str(b.dtype).replace("torch.", "") for b in live.backups.values()})
        edit = _editor(pool, handle, loras, device)
        out.update(patch_times(pool, handle, edit, rounds, device, ("host", "device")))
        out["ours_repatch_s"] = median(out["ours_edit_s"])
        out["by_threads"] = {n: edit_and_step(edit, step, rounds, n, device) for n in edit_threads}
        if not patch_only:
            fused = _recipe(handle, loras, WEIGHTS)
            plain, ours, patch, restore = [], [], [], []
            for _ in range(rounds):  # plain, fused, fused, plain: each state's two steps bracket the other's
                plain.append(timed(step, device)[0])
                patch.append(timed(lambda: pool.pipeline(fused), device)[0])
                ours += [timed(step, device)[0], timed(step, device)[0]]
                restore.append(timed(lambda: pool.plain(handle), device)[0])
                plain.append(timed(step, device)[0])
            out.update(plain_s=plain, ours_fused_s=ours, ours_restore_s=median(restore),
                       fused_vs_plain=median(ours) / median(plain))
        # what the blended model holds at its peak: UNet, backups, the patch's temporaries (and a step)
        out["ours_peak_mib"], out["ours_base_mib"] = _peak(device), base_mib
        pool.plain(handle)
        pool = live = None  # drops the backups
    if patch_only:
        return out
    out["unet_mib"] = unet_mib

    base_mib = _reset(device)
    for i, lora in enumerate(loras):
        load_into_diffusers(unet, lora, f"lora{i}")
    names = [f"lora{i}" for i in range(len(loras))]
    out["diffusers_set_adapters_s"] = timed(lambda: unet.set_adapters(names, list(WEIGHTS)), device)[0]
    adapter_layer = next(m for m in unet.modules() if hasattr(m, "lora_A") and len(m.lora_A))
    out["diffusers_adapter_dtype"] = str(next(iter(adapter_layer.lora_A.values())).weight.dtype).replace("torch.", "")
    disabled, unfused = [], []
    with torch.no_grad():
        for _ in range(rounds):
            unet.disable_adapters()
            disabled.append(timed(step, device)[0])
            unet.enable_adapters()
            unfused += [timed(step, device)[0], timed(step, device)[0]]
            unet.disable_adapters()
            disabled.append(timed(step, device)[0])
        unet.enable_adapters()
        out["diffusers_peak_mib"], out["diffusers_base_mib"] = _peak(device), base_mib
        out["diffusers_fuse_s"] = timed(lambda: unet.fuse_lora(), device)[0]
        out["diffusers_fused_step_s"] = timed(step, device)[0]
        out["diffusers_unfuse_s"] = timed(lambda: unet.unfuse_lora(), device)[0]
    out.update(plain_behind_peft_s=disabled, diffusers_unfused_s=unfused)
    out["unfused_vs_plain"] = median(unfused) / median(disabled)
    # Steps after which a re-patch (our weight edit) has cost less than diffusers' adapter overhead.
    overhead = median(unfused) - median(disabled)
    out["repatch_break_even_steps"] = out["ours_repatch_s"] / overhead if overhead > 0 else math.inf
    out["peft_wrappers_vs_plain"] = median(disabled) / median(plain)
    return out


def _max_abs(weights: dict, reference: dict) -> float:
    return max(float((weights[p].detach().float() - reference[p].float()).abs().max()) for p in reference)


def restore_errors(scale: str, whole: bool, cycles: int, device, dtype, quick: bool = False) -> dict:
    """Fuse both LoRAs and restore, `cycles` times, ours then diffusers', on a fresh UNet (Flux
    transformer blocks for scale "flux", tiny ones when `quick`); on every LoRA target (`whole`) or
    on RESTORE_SUBSET."""
    if scale == "flux":
        unet = flux_transformer((FLUX_QUICK if quick else FLUX_DEV) | FLUX_BLOCKS, device, dtype, seed=0)
    else:
        unet = sdxl_unet(dtype, device, _config(scale))
    scope = [p for p in lora_targets(unet) if whole or p.startswith(RESTORE_SUBSET)]
    loras = [random_lora(unet, 32, 16.0, 1, dtype, paths=set(scope)), random_lora(unet, 16, 16.0, 2, dtype, paths=set(scope))]
    layers = {p: unet.get_submodule(p) for p in scope}

    def weights():
        return {p: getattr(m, "base_layer", m).weight for p, m in layers.items()}

    original = {p: w.detach().clone() for p, w in weights().items()}
    touched = sum(w.numel() for w in original.values())
    out = {"dtype": str(dtype).replace("torch.", ""), "modules": len(scope), "weights_touched": touched,
           "cycles": cycles, "scope": ("every LoRA target" if whole else "one transformer layer and resnet per width")
           + (" of 2 double + 2 single blocks" if scale == "flux" else "")}
    pool, handle = pool_for(unet, f"restore-{out['dtype']}")
    fused = _recipe(handle, loras, WEIGHTS)
    ours_errors, ours_fused, ours_times = {}, None, []
    for cycle in range(1, cycles + 1):
        seconds = timed(lambda: (pool.pipeline(fused), pool.plain(handle)), device)[0]
        ours_times.append(seconds)
        if cycle == 1:
            pool.pipeline(fused)
            ours_fused = {p: w.detach().clone() for p, w in weights().items()}
            pool.plain(handle)
        if cycle in (1, cycles):
            ours_errors[cycle] = _max_abs(weights(), original)
    pool = None  # drops the backups
    gc.collect()

    names = [f"lora{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras):
        load_into_diffusers(unet, lora, name)
    unet.set_adapters(names, list(WEIGHTS))
    theirs_errors, theirs_times = {}, []
    for cycle in range(1, cycles + 1):
        seconds = timed(lambda: unet.fuse_lora(), device)[0]
        if cycle == 1:
            out["fused_ours_vs_diffusers_max_abs"] = _max_abs(weights(), ours_fused)
            del ours_fused
        seconds += timed(lambda: unet.unfuse_lora(), device)[0]
        theirs_times.append(seconds)
        if cycle in (1, cycles):
            theirs_errors[cycle] = _max_abs(weights(), original)
    out.update(ours_after_1=ours_errors[1], ours_after_n=ours_errors[cycles],
               diffusers_after_1=theirs_errors[1], diffusers_after_n=theirs_errors[cycles],
               ours_cycle_s=median(ours_times), diffusers_cycle_s=median(theirs_times),
               weight_max_abs=max(float(w.float().abs().max()) for w in original.values()))
    return out


def report(scale: str, args, threads: int, device, dtype) -> dict:
    import torch

    if scale == "flux":  # the restore cycles only, in bf16 (what Flux checkpoints ship in)
        return {"scale": SCALES[scale], "restore": {"bfloat16": restore_flux(args, device)}}
    latent = 16 if scale == "tiny" else args.latent
    rounds = args.rounds * 5 if scale == "tiny" else args.rounds  # tiny steps take milliseconds: more rounds
    s = step_times(scale, latent, rounds, device, dtype, args.patch_only, args.edit_threads)
    gc.collect()
    print(f"fuse: {SCALES[scale]} ({s['unet_params'] / 1e6:,.0f}M params, {s['dtype']}, {s['device']}), "
          f"{s['lora_modules']} LoRA modules x 2, step = UNet forward at {latent}x{latent} latent, batch 2; "
          f"{threads} thread(s), medians over {s['rounds']} interleaved rounds", flush=True)
    print(f"  weight edit (re-patch of every layer): before {median(s['reference_repatch_s']):.3f} s, after "
          f"{s['ours_repatch_s']:.3f} s (x{s['repatch_speedup']:.2f} faster); first patch (+ backups, "
          f"{s['backup_mib']:,.0f} MiB in {'/'.join(s['backup_dtypes'])}): before {s['reference_first_patch_s']:.2f} s, "
          f"after {s['ours_first_patch_s']:.2f} s", flush=True)
    for n, t in s["by_threads"].items():
        print(f"  at {n} thread(s), side by side: weight edit {t['edit_s']:.3f} s, sampling step {t['step_s']:.3f} s "
              f"(edit / step x{t['edit_vs_step']:.2f})", flush=True)
    for place in ("host", "device"):
        if f"edit_{place}_s" in s:
            print(f"  backups in {place} memory ({s[f'backups_on_device_{place}']} on the GPU): first patch "
                  f"{s[f'first_patch_{place}_s']:.3f} s, edit {s[f'edit_{place}_s']:.3f} s")
    result = {"scale": SCALES[scale], "step": s, "restore": {}}
    if args.patch_only:
        return result
    unit = "allocated GPU memory" if device.type == "cuda" else "RSS"
    print(f"  plain {median(s['plain_s']):.3f} s | ours fused {median(s['ours_fused_s']):.3f} s "
          f"(x{s['fused_vs_plain']:.3f}) | diffusers unfused {median(s['diffusers_unfused_s']):.3f} s "
          f"(x{s['unfused_vs_plain']:.3f} of {median(s['plain_behind_peft_s']):.3f} s with adapters disabled)")
    print(f"  ours: restore {s['ours_restore_s']:.2f} s; diffusers: set_adapters {s['diffusers_set_adapters_s']:.3f} s, "
          f"fuse_lora {s['diffusers_fuse_s']:.2f} s, unfuse_lora {s['diffusers_unfuse_s']:.2f} s, fused step "
          f"{s['diffusers_fused_step_s']:.3f} s; adapters in {s['diffusers_adapter_dtype']}; a re-patch costs what the "
          f"unfused adapters add to {s['repatch_break_even_steps']:.3g} steps", flush=True)
    print(f"  held: UNet {s['unet_mib']:,.0f} MiB + our backups {s['backup_mib']:,.0f} MiB, or + diffusers' adapter "
          f"factors {s['lora_mib']:,.0f} MiB")
    print(f"  peak {unit}: blended (ours, backups included) {s['ours_peak_mib']:,.0f} MiB, diffusers' adapters "
          f"{s['diffusers_peak_mib']:,.0f} MiB (UNet weights {s['unet_mib']:,.0f} MiB; in use before: ours "
          f"{s['ours_base_mib']:,.0f}, diffusers {s['diffusers_base_mib']:,.0f})", flush=True)
    if args.skip_restore:
        return result
    for restore_dtype in (torch.float16, torch.bfloat16):
        r = restore_errors(scale, scale == "tiny" or args.restore_scope == "full", args.cycles, device, restore_dtype)
        gc.collect()
        result["restore"][r["dtype"]] = r
        print(f"  restore {r['dtype']} ({r['modules']} modules, {r['weights_touched'] / 1e6:.0f}M weights, {r['scope']}): "
              f"max abs diff after 1 / {r['cycles']} cycles: ours {r['ours_after_1']:.3g} / "
              f"{r['ours_after_n']:.3g}, diffusers {r['diffusers_after_1']:.3g} / "
              f"{r['diffusers_after_n']:.3g} (weights up to {r['weight_max_abs']:.3g}); cycle ours "
              f"{r['ours_cycle_s']:.2f} s, diffusers {r['diffusers_cycle_s']:.2f} s; fused weights ours vs "
              f"diffusers {r['fused_ours_vs_diffusers_max_abs']:.3g}", flush=True)
    return result


def restore_flux(args, device) -> dict:
    import torch

    r = restore_errors("flux", True, args.cycles, device, torch.bfloat16, quick=args.quick)
    gc.collect()
    print(f"fuse: {SCALES['flux']}{' (tiny width: --quick)' if args.quick else ''}")
    print(f"  restore {r['dtype']} ({r['modules']} modules, {r['weights_touched'] / 1e6:.0f}M weights, {r['scope']}): "
          f"max abs diff after 1 / {r['cycles']} cycles: ours {r['ours_after_1']:.3g} / {r['ours_after_n']:.3g}, "
          f"diffusers {r['diffusers_after_1']:.3g} / {r['diffusers_after_n']:.3g} (weights up to "
          f"{r['weight_max_abs']:.3g}); cycle ours {r['ours_cycle_s']:.2f} s, diffusers {r['diffusers_cycle_s']:.2f} s; "
          f"fused weights ours vs diffusers {r['fused_ours_vs_diffusers_max_abs']:.3g}", flush=True)
    return r


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "the tiny-sdxl UNet only (CI)")
    parser.add_argument("--scales", help="tiny, sdxl, flux, comma-separated (default: tiny,sdxl; --quick: tiny; flux: "
                        "restore cycles only)")
    parser.add_argument("--rounds", type=int, default=2, help="SDXL timing rounds, each plain-other-other-plain "
                        "(default: %(default)s; tiny: 5x as many)")
    parser.add_argument("--latent", type=int, default=32, help="SDXL latent size of the timed step (default: "
                        "%(default)s = 256 px; tiny: 16)")
    parser.add_argument("--cycles", type=int, default=10, help="fuse/restore cycles (default: %(default)s)")
    parser.add_argument("--restore-scope", choices=("subset", "full"), default="subset",
                        help="SDXL restore cycles on one transformer layer and resnet per width (default) or every target")
    parser.add_argument("--skip-restore", action="store_true")
    parser.add_argument("--patch-only", action="store_true",
                        help="only the patch figures (first patch, weight edits before/after); no steps, no diffusers")
    parser.add_argument("--edit-threads", default=None,
                        help="torch thread counts at which our weight edit and a sampling step are timed side by "
                             "side, comma-separated (default: 1 and the machine's cores; --quick and --gpu: none)")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU run: SDXL scale on CUDA in fp16 (fails without CUDA), restore cycles skipped, "
                             "backups in host and device memory")
    args = parser.parse_args(argv)
    scales = [s.strip() for s in (args.scales or ("tiny" if args.quick else "tiny,sdxl")).split(",") if s.strip()]
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device; this torch sees none")
        scales, args.skip_restore = ["sdxl"], True
    if args.edit_threads is None:
        args.edit_threads = "" if args.quick or args.gpu else f"1,{os.cpu_count()}"
    try:
        args.edit_threads = tuple(dict.fromkeys(int(n) for n in args.edit_threads.split(",") if n.strip()))
    except ValueError:
        parser.error(f"--edit-threads {args.edit_threads!r}: comma-separated thread counts, e.g. 1,2")
    if any(n < 1 for n in args.edit_threads):
        parser.error(f"--edit-threads {args.edit_threads}: thread counts start at 1")
    unknown = [s for s in scales if s not in SCALES]
    if unknown:
        parser.error(f"unknown scale(s) {unknown}; valid: {', '.join(SCALES)}")
    threads = setup_threads(args.threads)
    device, dtype = sdxl_device_dtype()
    result = {"row": "fuse", "mode": "quick" if args.quick else "full", "machine": machine(threads),
              "scales": {scale: report(scale, args, threads, device, dtype) for scale in scales}}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
