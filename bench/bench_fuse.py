"""Row 3, fusing: UNet step time of our fused model vs the plain base vs diffusers' unfused adapters,
and how exactly the base comes back after fuse/restore cycles (ours vs diffusers' unfuse_lora).

Two scales: the tiny-sdxl preset's UNet, and the real SDXL UNet config with random weights; bf16
on a CPU (fp16 has no fast CPU kernels), fp16 on CUDA. Two random LoRAs (rank 32 alpha 16, rank 16
alpha 16, weights 1.0 and 0.8) on every attention (to_q/k/v/out), feed-forward, proj_in/out and
resnet conv layer. One step = one UNet forward, batch 2 (classifier-free guidance), at a 16x16
(tiny) or 32x32 (SDXL, 256 px) latent. ``--quick``: the tiny scale only.

Step time, side by side in rounds ordered plain, other, other, plain; medians:
  phase 1 (no peft): the plain base; our pool fuses both LoRAs (patches W = W0 + sum w*delta in
    place) and steps twice; the pool restores. Ratio fused / plain. Also the patch and restore times.
  phase 2 (same UNet, both LoRAs loaded through diffusers' own loader, set_adapters weights): steps
    with adapters disabled (the plain base behind peft's wrappers) and with both adapters active
    (unfused). Ratio unfused / plain. Also fuse_lora, one fused step and unfuse_lora.
Restore: for fp16 and bf16, two LoRAs fused and restored 1 and 10 times, ours (pool) vs diffusers
(fuse_lora / unfuse_lora); max abs difference of every touched weight from a copy of the original.
On the tiny UNet they run on every target. At SDXL shapes the restore cycles run on the LoRA modules of down_blocks.1.attentions.0 (two
640-wide transformer layers, proj_in/out), down_blocks.1.resnets.0, the first 1280-wide transformer
layer of down_blocks.2 and mid_block.resnets.0 (every distinct LoRA layer kind and width), to stay
inside the time budget: the rounding error is per element, so more modules of the same shapes change
the time, not the figure. ``--restore-scope full`` runs them on every target.

    python bench/bench_fuse.py [--quick] [--scales tiny,sdxl] [--threads 1] [--rounds 2] [--latent 32] [--json OUT]
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (add_common_args, load_into_diffusers, lora_targets, machine, median, pool_for,  # noqa: E402
                    random_lora, sdxl_device_dtype, sdxl_unet, setup_threads, timed, unet_inputs, write_json)

WEIGHTS = (1.0, 0.8)
# One transformer layer and one resnet at each width (640, 1280), their attention's proj_in/out.
RESTORE_SUBSET = ("down_blocks.1.attentions.0.", "down_blocks.1.resnets.0.",
                  "down_blocks.2.attentions.0.transformer_blocks.0.", "mid_block.resnets.0.")


SCALES = {"tiny": "tiny-sdxl UNet", "sdxl": "real SDXL UNet, random weights"}


def _config(scale: str):
    if scale == "sdxl":
        return None  # the real SDXL UNet (common.sdxl_unet's default)
    from loraloom.bases.presets import preset_configs

    return preset_configs("tiny-sdxl")["unet"]


def _recipe(handle, loras, weights):
    from loraloom.bases.pool import Application, ModelRecipe

    apps = tuple(Application(lora, f"lora{i}", w, w) for i, (lora, w) in enumerate(zip(loras, weights)))
    return ModelRecipe(handle, fused=apps)


def step_times(scale: str, latent: int, rounds: int, device, dtype) -> dict:
    import torch

    unet = sdxl_unet(dtype, device, _config(scale))
    params = sum(p.numel() for p in unet.parameters())
    loras = [random_lora(unet, 32, 16.0, 1, dtype), random_lora(unet, 16, 16.0, 2, dtype)]
    step = unet_inputs(unet, latent, 2, dtype, device)
    pool, handle = pool_for(unet, "step")
    fused = _recipe(handle, loras, WEIGHTS)
    out = {"unet_params": params, "lora_modules": loras[0].n_modules, "latent": latent, "batch": 2,
           "dtype": str(dtype).replace("torch.", ""), "device": str(device), "rounds": rounds}
    plain, ours, patch, restore = [], [], [], []
    with torch.no_grad():
        step()  # warm-up (allocator, kernels)
        for _ in range(rounds):  # plain, fused, fused, plain: each state's two steps bracket the other's
            plain.append(timed(step, device)[0])
            patch.append(timed(lambda: pool.pipeline(fused), device)[0])
            ours += [timed(step, device)[0], timed(step, device)[0]]
            restore.append(timed(lambda: pool.plain(handle), device)[0])
            plain.append(timed(step, device)[0])
    pool = None  # drops the backups
    gc.collect()
    # The first patch also copies the touched weights into the pool's backup; later ones rewrite
    # W = W0 + sum(w * delta) from it, which is also what a LoRA weight edit costs.
    out.update(plain_s=plain, ours_fused_s=ours, ours_first_patch_s=patch[0], ours_repatch_s=median(patch[1:]),
               ours_restore_s=median(restore))
    out["fused_vs_plain"] = median(ours) / median(plain)

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


def restore_errors(scale: str, whole: bool, cycles: int, device, dtype) -> dict:
    """Fuse both LoRAs and restore, `cycles` times, ours then diffusers', on a fresh UNet; on every
    LoRA target (`whole`) or on RESTORE_SUBSET."""
    unet = sdxl_unet(dtype, device, _config(scale))
    scope = [p for p in lora_targets(unet) if whole or p.startswith(RESTORE_SUBSET)]
    loras = [random_lora(unet, 32, 16.0, 1, dtype, paths=set(scope)), random_lora(unet, 16, 16.0, 2, dtype, paths=set(scope))]
    layers = {p: unet.get_submodule(p) for p in scope}

    def weights():
        return {p: getattr(m, "base_layer", m).weight for p, m in layers.items()}

    original = {p: w.detach().clone() for p, w in weights().items()}
    touched = sum(w.numel() for w in original.values())
    out = {"dtype": str(dtype).replace("torch.", ""), "modules": len(scope), "weights_touched": touched,
           "cycles": cycles, "scope": "every LoRA target" if whole else "one transformer layer and resnet per width"}
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

    latent = 16 if scale == "tiny" else args.latent
    rounds = args.rounds * 5 if scale == "tiny" else args.rounds  # tiny steps take milliseconds: more rounds
    s = step_times(scale, latent, rounds, device, dtype)
    gc.collect()
    print(f"fuse: {SCALES[scale]} ({s['unet_params'] / 1e6:,.0f}M params, {s['dtype']}, {s['device']}), "
          f"{s['lora_modules']} LoRA modules x 2, step = UNet forward at {latent}x{latent} latent, batch 2; "
          f"{threads} thread(s), medians over {s['rounds']} interleaved rounds", flush=True)
    print(f"  plain {median(s['plain_s']):.3f} s | ours fused {median(s['ours_fused_s']):.3f} s "
          f"(x{s['fused_vs_plain']:.3f}) | diffusers unfused {median(s['diffusers_unfused_s']):.3f} s "
          f"(x{s['unfused_vs_plain']:.3f} of {median(s['plain_behind_peft_s']):.3f} s with adapters disabled)")
    print(f"  ours: first patch {s['ours_first_patch_s']:.2f} s, re-patch (= a weight edit) {s['ours_repatch_s']:.2f} s, "
          f"restore {s['ours_restore_s']:.2f} s; diffusers: set_adapters {s['diffusers_set_adapters_s']:.3f} s, "
          f"fuse_lora {s['diffusers_fuse_s']:.2f} s, unfuse_lora {s['diffusers_unfuse_s']:.2f} s, fused step "
          f"{s['diffusers_fused_step_s']:.3f} s; adapters in {s['diffusers_adapter_dtype']}; a re-patch costs what the "
          f"unfused adapters add to {s['repatch_break_even_steps']:.3g} steps", flush=True)
    result = {"scale": SCALES[scale], "step": s, "restore": {}}
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "the tiny-sdxl UNet only (CI)")
    parser.add_argument("--scales", default="tiny,sdxl", help="tiny, sdxl or both (default: %(default)s; --quick: tiny)")
    parser.add_argument("--rounds", type=int, default=2, help="SDXL timing rounds, each plain-other-other-plain "
                        "(default: %(default)s; tiny: 5x as many)")
    parser.add_argument("--latent", type=int, default=32, help="SDXL latent size of the timed step (default: "
                        "%(default)s = 256 px; tiny: 16)")
    parser.add_argument("--cycles", type=int, default=10, help="fuse/restore cycles (default: %(default)s)")
    parser.add_argument("--restore-scope", choices=("subset", "full"), default="subset",
                        help="SDXL restore cycles on one transformer layer and resnet per width (default) or every target")
    parser.add_argument("--skip-restore", action="store_true")
    args = parser.parse_args(argv)
    scales = ["tiny"] if args.quick else [s.strip() for s in args.scales.split(",") if s.strip()]
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
