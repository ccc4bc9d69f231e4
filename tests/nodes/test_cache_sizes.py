"""The cache's byte accounting for the values our nodes put on wires (tensors, modules, images, LoRAs,
recipes): each allocation counted once, however many cached values hold it."""

import dataclasses
import sys

import torch
from PIL import Image

from loraloom.graph_runtime import CacheStore, estimate_nbytes
from loraloom.graph_runtime.cache import size_stats


def test_estimates_for_real_values():
    t = torch.zeros(256, 1024, dtype=torch.float16)
    assert estimate_nbytes(t) == 256 * 1024 * 2
    assert estimate_nbytes(t[:10]) == 256 * 1024 * 2, "a view holds its whole storage"
    assert estimate_nbytes((t, t[:10], t.view(-1))) < 256 * 1024 * 2 + 200, "views of one storage count once"
    module = torch.nn.Linear(1000, 500)
    assert estimate_nbytes(module) == (1000 * 500 + 500) * 4
    assert estimate_nbytes(Image.new("RGB", (64, 32))) == 64 * 32 * 3
    shared = torch.ones(1000)
    assert estimate_nbytes((shared, [shared, {"again": shared}])) < 2 * 4000, "a shared tensor counts once"


def test_lora_values_report_their_size(lora_files):
    from loraloom.lora.readers import read_lora
    from loraloom.lora.safefile import inspect_header

    root, names = lora_files
    lora = read_lora(root / names["tiny-sdxl/kohya"])
    again = read_lora(root / names["tiny-sdxl/kohya"])  # the same file read twice: two sets of tensors
    # The reader's one buffer holds the file's whole data section: the factors and the .alpha scalars.
    header = inspect_header(root / names["tiny-sdxl/kohya"])
    assert estimate_nbytes(lora) == header.size - header.data_start > lora.nbytes > 0
    store = CacheStore(max_bytes=lora.nbytes * 2 - 1)
    store.put("a", (lora,), None)
    store.put("b", (again,), None)
    assert "a" not in store and "b" in store, "two LoRAs do not fit a budget of less than two"
    store.put("c", (again,), None)
    assert "b" in store and "c" in store, "one LoRA held by two entries fits: it is one allocation"


def _recipe(lora, n=1):
    """A plain-base recipe with ``lora`` applied ``n`` times, built step by step as WeightedBlend does."""
    from loraloom.bases.pool import Application, BaseModel, ModelRecipe

    recipe = ModelRecipe(BaseModel("tiny-sdxl", "sdxl", "fp32", "cpu", "preset:tiny-sdxl@1"))
    steps = []
    for i in range(n):
        recipe = dataclasses.replace(recipe, adapters=recipe.adapters + (Application(lora, f"l{i}", 0.5),))
        steps.append(recipe)
    return steps


def test_load_blend_and_fuse_outputs_count_the_lora_once(runtime):
    wf = {
        "1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sdxl", "dtype": "fp32", "device": "cpu"}},
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": runtime.names["tiny-sdxl/diffusers"]}},
        "3": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": 0.7,
                                                        "text_encoder_weight": 0.7, "block_weights": ""}},
        "4": {"class_type": "Fuse", "inputs": {"model": ["3", 0], "lora_scale": 1.0, "adapter_names": ""}},
        "5": {"class_type": "SaveLoRA", "inputs": {"lora": ["2", 0]}},  # an output node; not run here
    }
    result = runtime.run(wf, outputs=["4"])
    assert result.executed == ["1", "2", "3", "4"]
    lora = result.value("2")
    assert result.value("3").adapters[0].lora is lora and result.value("4").fused[0].lora is lora
    entries = list(runtime.cache._entries.values())
    assert len(entries) == 4
    held = [e for e in entries if e.nbytes >= lora.nbytes]
    assert len(held) == 3, "LoadLoRA, WeightedBlend and Fuse each hold the LoRA"
    together = estimate_nbytes([(e.outputs, e.ui) for e in entries])
    assert runtime.cache.nbytes <= together + 1000, "the store's total is what all entries hold together"
    assert lora.nbytes <= runtime.cache.nbytes < lora.nbytes + 20_000, \
        f"the LoRA's {lora.nbytes} bytes count once, not three times: {runtime.cache.nbytes}"


def test_eviction_keeps_shared_bytes_while_another_entry_holds_them(lora_files):
    from loraloom.lora.readers import read_lora
    from loraloom.lora.safefile import inspect_header

    root, names = lora_files
    lora = read_lora(root / names["tiny-sdxl/diffusers"])
    blend, = _recipe(lora)
    x, y = torch.zeros(4000), torch.zeros(lora.nbytes // 4)
    one = sys.getsizeof((x,))  # each entry's outputs tuple
    store = CacheStore(max_bytes=lora.nbytes + x.nbytes + 2 * one)
    store.put("load", (lora,), None)
    store.put("blend", (blend,), None)
    assert store.nbytes == lora.nbytes + 2 * one, "LoadLoRA's and WeightedBlend's outputs share the tensors"
    store.get("blend")
    store.put("x", (x,), None)
    assert "load" not in store and "blend" in store, "the least recently used entry was evicted"
    assert store.nbytes == lora.nbytes + x.nbytes + 2 * one, "the blend still holds the LoRA: its bytes stay"
    store.put("y", (y,), None)
    assert "blend" not in store and "x" in store, "now the blend went too"
    assert store.nbytes == x.nbytes + y.nbytes + 2 * one, "the LoRA's bytes left with their last holder"


def test_a_long_blend_chain_sizes_each_value_once(lora_files):
    """A chain of n WeightedBlend-style recipes, each cached: every recipe holds every earlier
    application, yet the LoRA's tensors are resolved once and each new value is sized once, so the
    work grows linearly with the chain, not with its square times the LoRA's tensor count."""
    from loraloom.lora.readers import read_lora
    from loraloom.lora.safefile import inspect_header

    root, names = lora_files
    lora = read_lora(root / names["tiny-sdxl/diffusers"])
    n_tensors = len(lora.__loraloom_parts__())
    store = CacheStore()
    for n in (50, 100):
        tensors, values = size_stats.tensors, size_stats.values
        fresh = dataclasses.replace(lora)  # a new LoRA value over the same tensors
        for i, recipe in enumerate(_recipe(fresh, n)):
            store.put(f"{n}:{i}", (recipe,), None)
        assert size_stats.tensors - tensors == n_tensors, "the LoRA's tensors are resolved once per LoRA value"
        assert size_stats.values - values == 1 + n, "the LoRA once, then one recipe per step"
    assert lora.nbytes <= store.nbytes < lora.nbytes + 150 * 2000, "its tensors count once across 150 entries"
