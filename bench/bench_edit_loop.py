"""Row 1, the edit loop: the shipped blend workflow (tiny-sdxl, two demo LoRAs, set_adapters weights
[0.7, 0.8], 20 steps at 128 px) run once, then re-run after editing only the prompt and after
editing only a LoRA weight, against the diffusers guide's plain script making the same edits.

Ours: one `loraloom.Runtime` kept across runs. For each edit: the run's wall time, which nodes
executed, files opened (a Python audit hook on ``open``) and bytes read (/proc/self/io rchar), and
the model pool's load count. "The sampling itself" is the same ``pipe(...)`` call the Sample node
makes, on the same live pipeline, timed directly (and checked to give the same image). Bytes read
count read() calls only: a memory-mapped safetensors load would not show there, but our LoRA
reader and the file fingerprints use read(), and the opened-files count covers every Python open.

The guide's script (diffusers' "merge LoRAs" guide, blend section): ``from_pretrained`` (the preset
saved as a diffusers folder, offline), ``load_lora_weights`` for both demo LoRAs,
``set_adapters([...], [0.7, 0.8])``, sample, save a PNG. A script knows no other way to take a new
prompt than running again, so its prompt edit is the whole script. For a weight edit we time what a
notebook user does, the cheapest edit diffusers allows: call ``set_adapters`` with the new weight,
sample again and save.

Rounds are interleaved (ours prompt edit and direct sampling, in alternating order; ours weight edit,
direct sampling; the guide's script; the guide's weight edit); figures are medians. ``--quick``: 4 steps at 64 px, 2 rounds.

    python bench/bench_edit_loop.py [--quick] [--threads 1] [--rounds 5] [--json OUT]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, DEMO_LORAS, add_common_args, bytes_read, machine, median, setup_threads, timed, write_json  # noqa: E402

WORKFLOW = REPO / "workflows" / "api" / "blend_api.json"
LOADERS = ("LoraLoomLoadBase", "LoraLoomLoadLoRA")


class FileOpens:
    """Counts files opened for reading through Python (an audit hook on ``open``): files opened to
    be written (the saved PNG), folders (opened to fsync them) and /proc, /sys are left out."""

    def __init__(self):
        self.paths: list[str] = []
        self.active = False
        first = bytes_read()
        self.rchar_overhead = bytes_read() - first  # reading /proc/self/io itself
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if not (self.active and event == "open" and isinstance(args[0], (str, Path))):
            return
        path, mode, flags = str(args[0]), args[1], args[2]
        writes = ("w" in mode or "a" in mode or "+" in mode or "x" in mode) if isinstance(mode, str) else \
            bool(flags & (os.O_WRONLY | os.O_RDWR))
        if not (writes or path.startswith(("/proc/", "/sys/")) or os.path.isdir(path)):
            self.paths.append(path)

    def measure(self, fn):
        """(result, paths opened for reading, bytes read) of one call."""
        self.paths, self.active = [], True
        before = bytes_read()
        try:
            result = fn()
        finally:
            self.active = False
        return result, list(self.paths), bytes_read() - before - self.rchar_overhead


def sample_inputs(wf: dict) -> dict:
    return dict(wf["5"]["inputs"])


def direct_sample(pipe, inputs: dict):
    """The pipe(...) call of the Sample node (nodes/sample.py), made directly."""
    import torch

    with torch.inference_mode():
        out = pipe(prompt=inputs["prompt"], negative_prompt=inputs["negative_prompt"] or None,
                   num_inference_steps=inputs["steps"], guidance_scale=inputs["guidance"], width=inputs["width"],
                   height=inputs["height"], num_images_per_prompt=inputs["batch_size"],
                   generator=torch.Generator("cpu").manual_seed(inputs["seed"]), output_type="pt")
    return out.images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous()


class GuideScript:
    """The guide's plain diffusers script, stage by stage."""

    def __init__(self, folder: Path, out_dir: Path, inputs: dict):
        self.folder, self.out_dir, self.inputs = folder, out_dir, inputs
        self.pipe = None
        self.n = 0

    def run_all(self, prompt: str) -> dict:
        """The whole script: load, LoRAs, set_adapters, sample, save. Returns seconds per stage."""
        from diffusers import StableDiffusionXLPipeline

        from loraloom.bases.devices import resolve

        dtype, device = resolve("auto", "auto")
        stages = {}
        stages["from_pretrained"], pipe = timed(lambda: StableDiffusionXLPipeline.from_pretrained(
            str(self.folder), dtype=dtype, local_files_only=True).to(device))
        pipe.set_progress_bar_config(disable=True)
        stages["load_lora_weights"], _ = timed(lambda: (
            pipe.load_lora_weights(str(DEMO_LORAS / "demo-a.safetensors"), adapter_name="demo_a"),
            pipe.load_lora_weights(str(DEMO_LORAS / "demo-b.safetensors"), adapter_name="demo_b")))
        self.pipe = pipe
        stages.update(self.weight_edit(0.7, prompt))
        return stages

    def weight_edit(self, weight: float, prompt: str | None = None) -> dict:
        """set_adapters with a new weight, sample, save."""
        import torch

        stages = {}
        stages["set_adapters"], _ = timed(lambda: self.pipe.set_adapters(["demo_a", "demo_b"], [weight, 0.8]))
        i = self.inputs
        stages["sample"], image = timed(lambda: self.pipe(
            prompt=prompt or i["prompt"], num_inference_steps=i["steps"], guidance_scale=i["guidance"], width=i["width"],
            height=i["height"], generator=torch.Generator("cpu").manual_seed(i["seed"])).images[0])
        self.n += 1
        self.image = image
        stages["save"], _ = timed(lambda: image.save(self.out_dir / f"guide_{self.n:05d}.png"))
        return stages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "4 steps at 64 px, 2 rounds (CI)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5; --quick 2)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    threads = setup_threads(args.threads)
    opens = FileOpens()

    from loraloom import Runtime
    from loraloom.bases.presets import build_pipeline

    wf = json.loads(WORKFLOW.read_text())
    if args.quick:
        wf["5"]["inputs"].update(steps=4, width=64, height=64)
    base_prompt, base_weight = wf["5"]["inputs"]["prompt"], wf["4"]["inputs"]["weight"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_edit_"))
    rt = Runtime(output_dir=tmp / "out", demo_loras=True)

    cold, _, _ = opens.measure(lambda: timed(lambda: rt.run(wf)))
    cold_s, cold_result = cold
    pool = rt.resources["model_pool"]
    folder = tmp / "tiny-sdxl"
    build_pipeline("tiny-sdxl", dtype="fp32", device="cpu").save_pretrained(folder)
    guide = GuideScript(folder, tmp, sample_inputs(wf))
    guide.run_all(base_prompt)  # warm-up (lazy imports, first calls); same inputs as the cold run
    import numpy as np

    ours_pixels = (cold_result.value("5")[0].numpy() * 255).round().astype(np.int16)
    image_diff = int(np.abs(np.asarray(guide.image).astype(np.int16) - ours_pixels).max())

    edits = {"prompt": [], "weight": []}
    direct, guide_full, guide_weight = [], [], []
    identical = True
    current, recipe = wf, cold_result.value("4")

    def sample_directly():
        return timed(lambda: direct_sample(pool.pipeline(recipe), sample_inputs(edited)))

    for r in range(rounds):
        for kind in ("prompt", "weight"):  # each edit changes only one input of the previous run's workflow
            edited = copy.deepcopy(current)
            if kind == "prompt":
                edited["5"]["inputs"]["prompt"] = f"{base_prompt}, study {r + 1}"
            else:
                edited["4"]["inputs"]["weight"] = round(base_weight - 0.05 * (r + 1), 4)
            # A prompt edit keeps the model: every other round the direct call goes first, so neither
            # side always runs on caches the other warmed.
            direct_first = kind == "prompt" and r % 2 == 1
            if direct_first:
                seconds_direct, image = sample_directly()
            loads = pool.stats["loads"]
            (seconds, result), paths, read = opens.measure(lambda: timed(lambda: rt.run(edited)))
            executed = [f"{n}:{edited[n]['class_type']}" for n in result.executed]
            edits[kind].append({"seconds": seconds, "executed": executed,
                                "timings": {f"{n}:{edited[n]['class_type']}": t for n, t in result.timings.items()},
                                "files_opened": len(paths), "bytes_read": read,
                                "loaders_executed": sum(edited[n]["class_type"] in LOADERS for n in result.executed),
                                "pool_loads": pool.stats["loads"] - loads})
            recipe = result.value("4")
            if not direct_first:
                seconds_direct, image = sample_directly()
            direct.append(seconds_direct)
            identical = identical and bool((image == result.value("5")).all())
            current = edited
        guide_full.append(guide.run_all(f"{base_prompt}, study {r + 1}"))
        guide_weight.append(guide.weight_edit(round(base_weight - 0.05 * (r + 1), 4)))

    def med(rows, key):
        return median([row[key] for row in rows])

    prompt_s, weight_s, direct_s = med(edits["prompt"], "seconds"), med(edits["weight"], "seconds"), median(direct)
    guide_full_s = median([sum(stages.values()) for stages in guide_full])
    guide_weight_s = median([sum(stages.values()) for stages in guide_weight])
    guide_sample_s = median([stages["sample"] for stages in guide_weight])
    def node_s(kind, class_type):
        return median([sum(t for n, t in e["timings"].items() if n.endswith(":" + class_type)) for e in edits[kind]])

    breakdown = {"sample_node_s": node_s("prompt", "LoraLoomSample"), "save_node_s": node_s("prompt", "SaveImage")}
    breakdown["runtime_s"] = prompt_s - breakdown["sample_node_s"] - breakdown["save_node_s"]
    figures = {
        "row": "edit_loop", "mode": "quick" if args.quick else "full", "machine": machine(threads), "rounds": rounds,
        "workflow": str(WORKFLOW.relative_to(REPO)), "steps": wf["5"]["inputs"]["steps"],
        "size": wf["5"]["inputs"]["width"],
        "cold_run_s": cold_s, "cold_executed": cold_result.executed,
        "prompt_edit": edits["prompt"], "weight_edit": edits["weight"], "direct_sampling_s": direct,
        "guide_script": guide_full, "guide_weight_edit": guide_weight,
        "prompt_edit_s": prompt_s, "weight_edit_s": weight_s, "sampling_s": direct_s,
        "prompt_edit_vs_sampling": prompt_s / direct_s, "prompt_edit_breakdown": breakdown, "weight_edit_vs_sampling": weight_s / direct_s,
        "guide_script_s": guide_full_s, "guide_weight_edit_s": guide_weight_s, "guide_sampling_s": guide_sample_s,
        "prompt_edit_vs_guide_script": prompt_s / guide_full_s, "weight_edit_vs_guide": weight_s / guide_weight_s,
        "weight_edit_files_opened": max(e["files_opened"] for e in edits["weight"]),
        "weight_edit_bytes_read": max(e["bytes_read"] for e in edits["weight"]),
        "weight_edit_loaders_executed": max(e["loaders_executed"] for e in edits["weight"]),
        "weight_edit_pool_loads": max(e["pool_loads"] for e in edits["weight"]),
        "prompt_edit_files_opened": max(e["files_opened"] for e in edits["prompt"]),
        "direct_same_image": identical, "guide_vs_ours_image_max_levels": image_diff,
    }
    p, w = edits["prompt"][-1], edits["weight"][-1]
    print(f"edit loop: {figures['workflow']} ({figures['steps']} steps, {figures['size']} px), {threads} thread(s), "
          f"median of {rounds} interleaved rounds; cold run {cold_s:.2f} s")
    print(f"  prompt edit {prompt_s:.3f} s = {figures['prompt_edit_vs_sampling']:.3f}x the sampling itself "
          f"({direct_s:.3f} s; same image: {identical}); ran {', '.join(p['executed'])}: Sample "
          f"{breakdown['sample_node_s']:.3f} s, SaveImage {breakdown['save_node_s']:.3f} s, the rest (validation, cache "
          f"keys, events) {breakdown['runtime_s']:.3f} s")
    print(f"  weight edit {weight_s:.3f} s = {figures['weight_edit_vs_sampling']:.3f}x the sampling; ran "
          f"{', '.join(w['executed'])}; files opened {figures['weight_edit_files_opened']}, bytes read "
          f"{figures['weight_edit_bytes_read']}, pipelines loaded {figures['weight_edit_pool_loads']}")
    stages = {k: median([s[k] for s in guide_full]) for k in guide_full[0]}
    print(f"  guide script re-run {guide_full_s:.3f} s (" + ", ".join(f"{k} {v:.3f}" for k, v in stages.items())
          + f"); ours prompt edit / guide script {figures['prompt_edit_vs_guide_script']:.3f}")
    print(f"  guide weight edit (set_adapters + sample + save) {guide_weight_s:.3f} s, its sampling {guide_sample_s:.3f} s; "
          f"ours weight edit / guide {figures['weight_edit_vs_guide']:.3f}")
    print(f"  guide's image vs ours (same prompt, seed, weights): max difference {image_diff} of 255 levels", flush=True)
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
