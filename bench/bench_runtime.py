"""Runtime overhead: a 1,000-node stub graph run cold, re-run cached, and the same functions called
in a plain Python loop; validation of a 10,000-node chain; the cache's sizing of a WeightedBlend chain
(each recipe holds every earlier LoRA application) at 250 and 1,000 steps, with the work counted;
a WeightedBlend chain of 500 and 2,000 nodes run end to end on tiny-sd15.
Prints ratios measured side by side.

    python bench/bench_runtime.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from loraloom.graph_runtime import CacheStore, Int, Link, NodeRegistry, Output, Runtime, node
from loraloom.graph_runtime.cache import size_stats
from loraloom.graph_runtime.graph import validate_prompt


@node(category="bench", inputs=[Int("value", 1, min=-10**9, max=10**9)], outputs=[Output("NUMBER")])
class BConst:
    def execute(self, value):
        return (value,)


@node(category="bench", inputs=[Link("a", "NUMBER"), Link("b", "NUMBER"), Int("k", 0, min=-10**9, max=10**9)],
      outputs=[Output("NUMBER")])
class BAdd:
    def execute(self, a, b, k):
        return ((a + b + k) % 1_000_003,)


@node(category="bench", inputs=[Link("x", "NUMBER")], outputs=[], output_node=True)
class BShow:
    def execute(self, x):
        return {"ui": {"value": [x]}}


REGISTRY = NodeRegistry([BConst, BAdd, BShow])


def graph(n: int) -> dict:
    """Const, then BAdd nodes each fed by the previous node and one 7 back; a Show at the end."""
    wf = {"0": {"class_type": "BConst", "inputs": {"value": 1}}}
    for i in range(1, n - 1):
        wf[str(i)] = {"class_type": "BAdd", "inputs": {"a": [str(i - 1), 0], "b": [str(max(0, i - 7)), 0], "k": i}}
    wf[str(n - 1)] = {"class_type": "BShow", "inputs": {"x": [str(n - 2), 0]}}
    return wf


def plain_loop(n: int) -> int:
    values = [BConst().execute(1)[0]]
    for i in range(1, n - 1):
        values.append(BAdd().execute(values[i - 1], values[max(0, i - 7)], i)[0])
    return BShow().execute(values[-1])["ui"]["value"][0]


def demo_lora(modules: int = 200, rank: int = 8, width: int = 320):
    """A LoRA value of ``modules`` linear modules (``2 * modules`` tensors), built in memory."""
    import torch

    from loraloom.lora.canonical import LoRA, LoRAModule

    gen = torch.Generator().manual_seed(0)
    mods = {f"block.{i}.proj": LoRAModule(torch.randn(rank, width, generator=gen),
                                          torch.randn(width, rank, generator=gen), float(rank))
            for i in range(modules)}
    return LoRA({"unet": mods}, "derived", fingerprint="bench")


def blend_chain(lora, n: int) -> tuple[float, int, int, int]:
    """Cache n recipes built as a chain of WeightedBlend nodes builds them (the same LoRA applied again
    at each step). Returns seconds, tensors and values sized, and the store's bytes."""
    from loraloom.bases.pool import Application, BaseModel, ModelRecipe

    lora = dataclasses.replace(lora)  # a fresh value over the same tensors: nothing remembered yet
    store = CacheStore()
    recipe = ModelRecipe(BaseModel("tiny-sdxl", "sdxl", "fp32", "cpu", "preset:bench"))
    tensors, values = size_stats.tensors, size_stats.values
    start = time.perf_counter()
    for i in range(n):
        recipe = dataclasses.replace(recipe, adapters=recipe.adapters + (Application(lora, f"l{i}", 0.5),))
        store.put(str(i), (recipe,), None)
    seconds = time.perf_counter() - start
    return seconds, size_stats.tensors - tensors, size_stats.values - values, store.nbytes


def blend_chain_run(n: int) -> tuple[float, int]:
    """Run LoadBase, LoadLoRA, ``n`` chained WeightedBlend nodes and a 1-step 64 px Sample on tiny-sd15,
    end to end in a fresh Runtime. Returns seconds and the LoRA deltas the pool computed."""
    import tempfile
    from pathlib import Path

    from loraloom import Runtime as LoomRuntime
    from loraloom.bases.pool import pool_from
    from loraloom.fixtures import write_fixtures

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lora = write_fixtures(root / "loras", presets=("tiny-sd15",))["tiny-sd15/diffusers"].relative_to(root / "loras").as_posix()
        wf = {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "dtype": "fp32", "device": "cpu"}},
              "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora}}}
        prev = "1"
        for i in range(n):
            wf[str(10 + i)] = {"class_type": "WeightedBlend", "inputs": {
                "model": [prev, 0], "lora": ["2", 0], "weight": 0.001, "text_encoder_weight": 0.001,
                "block_weights": ""}}
            prev = str(10 + i)
        wf["5"] = {"class_type": "Sample", "inputs": {"model": [prev, 0], "steps": 1, "width": 64, "height": 64}}
        wf["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}
        rt = LoomRuntime(lora_dirs=[root / "loras"], models_dir=root / "models", output_dir=root / "out")
        start = time.perf_counter()
        rt.run(wf)
        return time.perf_counter() - start, pool_from(rt.resources).stats["deltas"]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CI)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 9
    n = 1000
    wf = graph(n)

    expected = plain_loop(n)
    cold_results = []

    def cold():
        rt = Runtime(registry=REGISTRY)
        cold_results.append(rt.run(wf).outputs[str(n - 1)]["value"][0])

    warm_rt = Runtime(registry=REGISTRY)
    warm_rt.run(wf)

    def warm():
        assert warm_rt.run(wf).executed == []

    t_cold = median_time(cold, repeats)
    t_warm = median_time(warm, repeats)
    t_plain = median_time(lambda: plain_loop(n), repeats)
    assert cold_results[-1] == expected, "the graph must compute what the plain loop computes"

    chain = {"0": {"class_type": "BConst", "inputs": {"value": 1}}}
    for i in range(1, 9999):
        chain[str(i)] = {"class_type": "BAdd", "inputs": {"a": [str(i - 1), 0], "b": [str(i - 1), 0], "k": 0}}
    chain["9999"] = {"class_type": "BShow", "inputs": {"x": ["9998", 0]}}
    t_validate = median_time(lambda: validate_prompt(chain, REGISTRY), max(1, repeats // 3))

    lora = demo_lora()
    short = min((blend_chain(lora, 250) for _ in range(repeats)), key=lambda r: r[0])  # min: steadiest here
    long = min((blend_chain(lora, 1000) for _ in range(repeats)), key=lambda r: r[0])

    run_500 = blend_chain_run(500)
    run_2000 = blend_chain_run(2000)

    figures = {
        "nodes": n,
        "cold_run_s": t_cold,
        "cached_rerun_s": t_warm,
        "plain_loop_s": t_plain,
        "per_node_overhead_us": (t_cold - t_plain) / n * 1e6,
        "cold_vs_plain": t_cold / t_plain,
        "cached_vs_cold": t_warm / t_cold,
        "validate_10k_chain_s": t_validate,
        "blend_chain_250_s": short[0],
        "blend_chain_1000_s": long[0],
        "blend_chain_growth": long[0] / short[0],
        "blend_chain_1000_tensors_sized": long[1],
        "blend_chain_1000_values_sized": long[2],
        "blend_chain_1000_cache_bytes": long[3],
        "lora_bytes": lora.nbytes,
        "blend_chain_run_500_s": run_500[0],
        "blend_chain_run_2000_s": run_2000[0],
        "blend_chain_run_growth": run_2000[0] / run_500[0],
        "blend_chain_run_2000_deltas": run_2000[1],
    }
    print(f"runtime overhead, {n}-node graph (median of {repeats}):")
    print(f"  cold run        {t_cold * 1e3:8.1f} ms  ({figures['cold_vs_plain']:.0f}x the plain loop, "
          f"{figures['per_node_overhead_us']:.0f} us per node)")
    print(f"  cached re-run   {t_warm * 1e3:8.1f} ms  ({figures['cached_vs_cold']:.2f}x the cold run)")
    print(f"  plain loop      {t_plain * 1e3:8.3f} ms")
    print(f"  validate a 10,000-node chain: {t_validate * 1e3:.0f} ms")
    print(f"cache sizing of a WeightedBlend chain (a LoRA of {len(lora.__loraloom_parts__())} tensors, "
          f"{lora.nbytes / 2**20:.1f} MiB, applied at every step):")
    print(f"  250 steps {short[0] * 1e3:7.1f} ms, 1,000 steps {long[0] * 1e3:7.1f} ms "
          f"({figures['blend_chain_growth']:.1f}x for 4x the steps; 4 is linear, 16 quadratic)")
    print(f"  work at 1,000 steps: {long[1]} tensors and {long[2]} values sized; cache holds "
          f"{long[3] / 2**20:.2f} MiB (the LoRA counted once)")
    print("a WeightedBlend chain run end to end on tiny-sd15 (LoadBase, LoadLoRA, the chain, a 1-step Sample):")
    print(f"  500 nodes {run_500[0]:6.2f} s, 2,000 nodes {run_2000[0]:6.2f} s "
          f"({figures['blend_chain_run_growth']:.1f}x for 4x the nodes; 4 is linear); "
          f"{run_2000[1]} LoRA deltas computed for 2,000 applications")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
