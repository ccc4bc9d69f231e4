"""The cache's byte estimates for the values our nodes put on wires (tensors, modules, images, LoRAs)."""

import torch
from PIL import Image

from loraloom.graph_runtime import CacheStore, estimate_nbytes


def test_estimates_for_real_values():
    t = torch.zeros(256, 1024, dtype=torch.float16)
    assert estimate_nbytes(t) == 256 * 1024 * 2
    module = torch.nn.Linear(1000, 500)
    assert estimate_nbytes(module) == (1000 * 500 + 500) * 4
    assert estimate_nbytes(Image.new("RGB", (64, 32))) == 64 * 32 * 3
    shared = torch.ones(1000)
    assert estimate_nbytes((shared, [shared, {"again": shared}])) < 2 * 4000, "a shared tensor counts once"


def test_lora_values_report_their_size(lora_files):
    from loraloom.lora.readers import read_lora

    root, names = lora_files
    lora = read_lora(root / names["tiny-sdxl/kohya"])
    assert estimate_nbytes(lora) == lora.nbytes > 0
    store = CacheStore(max_bytes=lora.nbytes * 2 - 1)
    store.put("a", (lora,), None)
    store.put("b", (lora,), None)
    assert "a" not in store and "b" in store, "two LoRAs do not fit a budget of less than two"
