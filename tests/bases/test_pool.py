"""The model pool: exact restore in every dtype, least work, a known state after failures."""

import dataclasses

import pytest
import torch

from loraloom.lora.canonical import LoRA, LoRAModule
from loraloom.bases.pool import Application, ModelPool, ModelRecipe


def random_lora(pipe, seed, rank=4, every=3):
    """A LoRA on every ``every``-th linear layer of the UNet and text encoder."""
    gen = torch.Generator().manual_seed(seed)
    comps = {}
    for component in ("unet", "text_encoder"):
        mods = {}
        linears = [(n, m) for n, m in getattr(pipe, component).named_modules() if isinstance(m, torch.nn.Linear)]
        for name, layer in linears[::every]:
            out_f, in_f = layer.weight.shape
            mods[name] = LoRAModule(torch.randn(rank, in_f, generator=gen) * 0.3,
                                    torch.randn(out_f, rank, generator=gen) * 0.3, alpha=2.0, key=name)
        comps[component] = mods
    return LoRA(comps, "derived", fingerprint=f"random-{seed}")


def snapshot(pipe):
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for n, p in getattr(pipe, c).named_parameters()}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_restore_is_bit_exact_after_many_fuse_cycles(dtype):
    pool = ModelPool()
    base = pool.load("tiny-sdxl", dtype=dtype, device="cpu")
    pipe = pool.plain(ModelRecipe(base).base)
    original = snapshot(pipe)
    a, b = random_lora(pipe, 1), random_lora(pipe, 2, every=2)
    for i in range(10):
        apps = (Application(a, "a", 0.7 + i / 10, 0.5), Application(b, "b", -0.8, 1.0))
        pool.pipeline(ModelRecipe(base, fused=apps[:1], adapters=apps[1:]), lora_scale=0.5 + i / 20)
        pool.pipeline(ModelRecipe(base, fused=apps))
    assert any(not torch.equal(v, snapshot(pipe)[k]) for k, v in original.items()), "LoRAs must change weights"
    pool.plain(base)
    after = snapshot(pipe)
    changed = [k for k in original if not torch.equal(original[k], after[k])]
    assert not changed, f"{dtype}: {len(changed)} parameters differ after restore, e.g. {changed[:3]}"


def test_only_changed_layers_are_rewritten():
    pool = ModelPool()
    base = pool.load("tiny-sd15", dtype="fp32", device="cpu")
    pipe = pool.plain(base)
    a, b = random_lora(pipe, 1), random_lora(pipe, 2, every=5)
    pool.pipeline(ModelRecipe(base, adapters=(Application(a, "a"),)))
    before = dict(pool.stats)
    pool.pipeline(ModelRecipe(base, adapters=(Application(a, "a"),)))
    assert pool.stats == before, "the same recipe again must write nothing"
    pool.pipeline(ModelRecipe(base, adapters=(Application(a, "a", text_encoder_weight=0.5),)))
    patched = pool.stats["patched_layers"] - before["patched_layers"]
    assert patched == a.n_modules - len(a.components["unet"]), \
        f"changing the text-encoder weight must rewrite only text-encoder layers, rewrote {patched}"


def test_failure_midway_leaves_plain_base_and_pool_usable():
    pool = ModelPool()
    base = pool.load("tiny-sd15", dtype="fp32", device="cpu")
    pipe = pool.plain(base)
    original = snapshot(pipe)
    good = random_lora(pipe, 1)
    bad_mods = dict(good.components["unet"])
    name = sorted(bad_mods)[-1]
    bad_mods[name] = dataclasses.replace(bad_mods[name], down=torch.randn(4, 7))  # wrong input width
    bad = LoRA({"unet": bad_mods}, "derived", fingerprint="bad")
    with pytest.raises(Exception):
        pool.pipeline(ModelRecipe(base, adapters=(Application(good, "good"), Application(bad, "bad"))))
    after = snapshot(pipe)
    assert all(torch.equal(original[k], after[k]) for k in original), "a failed patch must restore the plain base"
    pool.pipeline(ModelRecipe(base, adapters=(Application(good, "good"),)))
    assert any(not torch.equal(original[k], v) for k, v in snapshot(pipe).items()), "the next recipe still applies"


def test_evicted_base_is_reloaded_from_its_handle():
    pool = ModelPool(max_bases=1)
    sd15 = pool.load("tiny-sd15", dtype="fp32", device="cpu")
    pool.load("tiny-sdxl", dtype="fp32", device="cpu")
    pipe = pool.plain(sd15)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pool.stats["loads"] == 3


def counting(loader):
    """The real loader, wrapped to record each build it does."""
    calls = []

    def load(source, **kwargs):
        calls.append((str(source), kwargs))
        return loader(source, **kwargs)

    return load, calls


def test_a_base_the_pool_holds_is_not_built_again(tiny_model_files):
    from loraloom.bases.loading import load_base

    loader, calls = counting(load_base)
    pool = ModelPool(loader=loader)
    auto = pool.load("tiny-sd15", dtype="auto", device="cpu")
    fp32 = pool.load("tiny-sd15", dtype="fp32", device="cpu")
    assert auto.key == fp32.key and len(calls) == 1, f"'auto' on the CPU is fp32: one build, got {len(calls)}"
    folder = tiny_model_files("tiny-sd15")["folder"]
    pool.load(folder, dtype="fp32", device="cpu")
    pool.load(str(folder), dtype="fp32", device="cpu")
    assert len(calls) == 2 and pool.stats["loads"] == 2, f"the same folder twice must build once: {calls}"
    pool.load("tiny-sd15", dtype="bf16", device="cpu")
    assert len(calls) == 3, "another dtype is another base"


def test_a_full_pool_lets_go_of_its_oldest_base_before_building_the_next():
    import gc
    import weakref

    from loraloom.bases.loading import load_base

    watched, alive_during_build = [], []

    def loader(source, **kwargs):
        if watched:
            gc.collect()
            alive_during_build.append(watched[0]() is not None)
        return load_base(source, **kwargs)

    pool = ModelPool(max_bases=1, loader=loader)
    sd15 = pool.load("tiny-sd15", dtype="fp32", device="cpu")
    watched.append(weakref.ref(pool.plain(sd15).unet))
    pool.load("tiny-sdxl", dtype="fp32", device="cpu")
    assert alive_during_build == [False], "peak memory must be one pipeline: evict, then build"


def test_bad_arguments_fail_before_anything_is_built():
    loader, calls = counting(lambda *a, **k: pytest.fail("built"))
    pool = ModelPool(loader=loader)
    with pytest.raises(ValueError, match="dtype 'fp64' is not valid"):
        pool.load("tiny-sd15", dtype="fp64")
    with pytest.raises(ValueError, match="takes no config folder"):
        pool.load("tiny-sd15", config="somewhere")
    assert calls == []


def test_each_call_gets_its_own_view_and_the_base_keeps_its_scheduler():
    from diffusers import DDIMScheduler

    pool = ModelPool()
    base = pool.load("tiny-sd15", dtype="fp32", device="cpu")
    first = pool.plain(base)
    original = dict(first.scheduler.config)
    first.scheduler = DDIMScheduler.from_config(first.scheduler.config)
    second = pool.plain(base)
    assert type(second.scheduler).__name__ == "EulerDiscreteScheduler", "a scheduler set on one view leaks"
    assert dict(second.scheduler.config) == original and second.config["scheduler"][1] == "EulerDiscreteScheduler"
    assert second.scheduler is not pool.plain(base).scheduler, "every view gets a fresh scheduler (per-run state)"
    assert second.unet is first.unet, "views share the base's modules: no copy of the weights"


def test_channels_last_lasts_only_while_a_recipe_asks_for_it():
    from loraloom.bases.pool import CompileOptions

    pool = ModelPool()
    base = pool.load("tiny-sd15", dtype="fp32", device="cpu")
    plain = pool.plain(base)
    convs = [p for p in plain.unet.parameters() if p.dim() == 4]
    values = [p.detach().clone() for p in convs]
    compiled = pool.pipeline(ModelRecipe(base, compile=CompileOptions(channels_last=True)))
    assert compiled.unet is not plain.unet, "a compile recipe runs a compiled wrapper, not the base's UNet"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(not p.is_contiguous() for p in convs if p.shape[2:] != (1, 1)), "3x3 kernels change layout"
    pool.pipeline(ModelRecipe(base, compile=CompileOptions(channels_last=False)))
    assert all(p.is_contiguous() for p in plain.unet.parameters()), "dropping channels_last restores the layout"
    pool.pipeline(ModelRecipe(base, compile=CompileOptions(channels_last=True)))
    again = pool.plain(base)
    assert again.unet is plain.unet, "without compile options the eager UNet runs"
    assert all(p.is_contiguous() for p in plain.unet.parameters()), "dropping compile options restores the layout"
    assert all(torch.equal(p, v) for p, v in zip(convs, values)), "layout changes never change values"
    assert pool.stats["compiles"] == 2, "one wrapper per compile options, made once"
