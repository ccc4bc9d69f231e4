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


# ------------------------------------------------------------------ the per-layer patch maths

def per_delta(source, entries):
    """The maths the patch must equal: fp32 backup plus each application's full fp32 delta, added in
    order, cast once (the pool's maths before the one-matmul patch)."""
    from loraloom.lora.canonical import delta

    new = source.to(torch.float32, copy=True)
    for _fp, coeff, module in entries:
        new.add_(delta(module, source.shape), alpha=coeff)
    return new.to(source.dtype)


def within_one_step(got, want):
    """Per element: got is want or one of its neighbours in their dtype (one rounding step apart)."""
    bits = {torch.float16: 10, torch.bfloat16: 7}[want.dtype]
    widest = torch.maximum(got.float().abs(), want.float().abs())
    _mantissa, exponent = torch.frexp(widest)
    step = torch.ldexp(torch.ones_like(widest), (exponent - 1 - bits).clamp(min=-24))
    return (got.float() - want.float()).abs() <= step


def layer_entries(shape, dtype, gen, mixed=True):
    """Applications on one layer: two LoRAs of ranks 8 and 4, the first applied twice (a blend chain),
    and (``mixed``) a LoHa and a LoKr beside them."""
    from loraloom.lora.canonical import LoHaModule, LoKrModule

    out, flat_in = shape[0], int(torch.tensor(shape[1:]).prod())

    def lora(rank, alpha):
        down = (torch.randn(rank, flat_in, generator=gen) / flat_in ** 0.5).to(dtype)
        up = (torch.randn(out, rank, generator=gen) * 0.05).to(dtype)
        if len(shape) == 4:
            down, up = down.reshape(rank, *shape[1:]), up.reshape(out, rank, 1, 1)
        return LoRAModule(down, up, alpha)

    a, b = lora(8, 4.0), lora(4, 3.0)
    entries = [("a", 0.7, a), ("b", -0.8, b), ("a", 0.3, a)]
    if mixed:
        r = lambda *s: (torch.randn(*s, generator=gen) * 0.1).to(dtype)  # noqa: E731
        entries.append(("h", 0.6, LoHaModule(r(out, 2), r(2, flat_in), r(out, 2), r(2, flat_in), alpha=2.0)))
        entries.append(("k", 0.5, LoKrModule(alpha=1.0, w1=r(2, 2), w2=r(out // 2, flat_in // 2))))
    return tuple(entries)


# a linear layer past the bf16 matmul's threshold, a small one, and a conv layer (flattened for the matmul)
SHAPES = [(320, 256), (24, 40), (64, 128, 3, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mixed", [False, True], ids=["lora", "lora+loha+lokr"])
def test_patch_equals_the_per_delta_maths(dtype, shape, mixed):
    from loraloom.bases.pool import patch_weight

    gen = torch.Generator().manual_seed(sum(shape))
    source = (torch.randn(*shape, generator=gen) * 0.05).to(dtype)
    entries = layer_entries(shape, dtype, gen, mixed)
    weight = torch.nn.Parameter(source.clone())
    computed = patch_weight(weight, source, entries)
    want = per_delta(source, entries)
    assert computed == len(entries) - 1, "a module applied twice is computed once"
    assert not torch.equal(weight.detach(), source), "the patch must change the weight"
    if dtype == torch.float32:
        torch.testing.assert_close(weight.detach(), want, atol=1e-6, rtol=1e-6)
    else:  # one rounding of the same sum: at most one step apart, and rarely that
        assert bool(within_one_step(weight.detach(), want).all()), f"{dtype} {shape}: over one step from the per-delta maths"
        differ = float((weight.detach() != want).float().mean())
        assert differ < 0.1, f"{dtype} {shape}: {differ:.1%} differ"


@pytest.mark.parametrize("coeffs", [(0.9, 0.8), (1.0, 0.8), (0.45, -0.9)])
def test_bf16_patch_is_the_exact_sum_rounded_once_but_for_a_tiny_fraction(coeffs):
    """The bf16 matmul path at a real layer width (two LoRAs of ranks 32 and 16, as the bench's):
    every weight within one step of the float64 sum rounded once, and under 0.05% of them off it
    (rounding the scaled factors to bf16 without their remainders puts ~5% off)."""
    from loraloom.bases.pool import patch_weight
    from loraloom.lora.canonical import delta

    gen = torch.Generator().manual_seed(12)
    size = 1280
    source = (torch.randn(size, size, generator=gen) * size ** -0.5).bfloat16()

    def lora(rank, alpha):
        return LoRAModule((torch.randn(rank, size, generator=gen) / size ** 0.5).bfloat16(),
                          (torch.randn(size, rank, generator=gen) * 0.05 / rank ** 0.5).bfloat16(), alpha)

    entries = tuple((f"l{i}", c, m) for i, (c, m) in enumerate(zip(coeffs, (lora(32, 16.0), lora(16, 16.0)))))
    weight = torch.nn.Parameter(source.clone())
    patch_weight(weight, source, entries)
    exact = source.double() + sum(c * delta(m, dtype=torch.float64) for _fp, c, m in entries)
    got, rounded = weight.detach(), exact.to(torch.bfloat16)
    assert bool(within_one_step(got, rounded).all()), f"{coeffs}: over one bf16 step from the exact sum"
    off = float((got != rounded).double().mean())
    assert off < 5e-4, f"{coeffs}: {off:.3%} of weights off the exact sum rounded once"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_result_depends_on_the_backup_and_recipe_only(dtype):
    """What a weight held before (another recipe's patch, a channels_last layout) never shows."""
    from loraloom.bases.pool import patch_weight

    gen = torch.Generator().manual_seed(3)
    shape = (64, 128, 3, 3)
    source = (torch.randn(*shape, generator=gen) * 0.05).to(dtype)
    entries, other = layer_entries(shape, dtype, gen, mixed=False), layer_entries(shape, dtype, gen, mixed=True)
    fresh = torch.nn.Parameter(source.clone())
    patch_weight(fresh, source, entries)
    reused = torch.nn.Parameter(source.clone().to(memory_format=torch.channels_last))
    patch_weight(reused, source, other)
    patch_weight(reused, source, entries)
    assert reused.is_contiguous(memory_format=torch.channels_last), "the patch keeps the weight's layout"
    assert torch.equal(fresh.detach(), reused.detach()), "the same recipe must give the same bits"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_pool_fuse_equals_diffusers_set_adapters_and_fuse_lora(dtype):
    """Two LoRAs at weights 1.0 and -0.6 on the tiny SDXL UNet: the pool's patched weights against
    diffusers' set_adapters + fuse_lora, and both against the exact sum (float64). fp32: equal to
    rounding. bf16: ours is the exact sum rounded once (within one step of it), never further from it
    than diffusers' (which rounds its delta to bf16 before adding)."""
    from diffusers import StableDiffusionXLPipeline

    from loraloom.bases.adapters import peft_inputs
    from loraloom.bases.presets import build_pipeline
    from loraloom.lora.canonical import delta

    pool = ModelPool()
    base = pool.load("tiny-sdxl", dtype=dtype, device="cpu")
    pipe = pool.plain(base)
    original = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    loras = [random_lora(pipe, 1, rank=8, every=1), random_lora(pipe, 2, rank=4, every=2)]
    loras = [LoRA({"unet": lora.components["unet"]}, "derived", fingerprint=lora.fingerprint) for lora in loras]
    weights = (1.0, -0.6)
    ref = build_pipeline("tiny-sdxl", dtype=dtype, device="cpu")
    for i, lora in enumerate(loras):
        tensors, metadata = peft_inputs(lora, {"unet": ref.unet})
        StableDiffusionXLPipeline.load_lora_into_unet(tensors, None, ref.unet, adapter_name=f"l{i}", metadata=metadata)
    ref.unet.set_adapters(["l0", "l1"], list(weights))
    ref.unet.fuse_lora()
    pool.pipeline(ModelRecipe(base, fused=tuple(Application(l, f"l{i}", w) for i, (l, w) in enumerate(zip(loras, weights)))))
    mine = dict(pipe.unet.named_parameters())
    compared = 0
    for name, module in ref.unet.named_modules():
        if not (hasattr(module, "base_layer") and hasattr(module, "lora_A") and len(module.lora_A)):
            continue
        got, theirs = mine[f"{name}.weight"].detach(), module.base_layer.weight.detach()
        exact = original[f"{name}.weight"].double()
        for lora, w in zip(loras, weights):
            if name in lora.components["unet"]:
                exact += w * delta(lora.components["unet"][name], exact.shape, dtype=torch.float64)
        if dtype == "fp32":
            torch.testing.assert_close(got, theirs, atol=1e-6, rtol=1e-5, msg=f"{name}: ours vs fuse_lora")
        else:
            assert bool(within_one_step(got, exact.to(got.dtype)).all()), f"{name}: over one bf16 step from the exact sum"
            ours_err, their_err = (got.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
            assert ours_err <= their_err, f"{name}: ours {ours_err:.3g} from the exact sum, fuse_lora {their_err:.3g}"
        compared += 1
    assert compared == len(loras[0].components["unet"]), f"compared {compared} layers"


def test_an_interrupt_mid_patch_leaves_the_plain_base_and_the_next_patch_is_the_same():
    """check_interrupt raising partway through a re-patch (a weight edit) restores every layer; the
    recipe applied afterwards gives the weights a pool that never saw the interrupt gives."""
    pool = ModelPool()
    base = pool.load("tiny-sdxl", dtype="bf16", device="cpu")
    pipe = pool.plain(base)
    original = snapshot(pipe)
    a, b = random_lora(pipe, 1), random_lora(pipe, 2, every=2)
    first = ModelRecipe(base, fused=(Application(a, "a", 0.7), Application(b, "b", -0.8)))
    edited = ModelRecipe(base, fused=(Application(a, "a", 0.9), Application(b, "b", -0.8)))
    pool.pipeline(first)
    calls = []

    def interrupt():
        calls.append(pool.stats["patched_layers"])
        if len(calls) == 3:
            raise KeyboardInterrupt

    before = pool.stats["patched_layers"]
    with pytest.raises(KeyboardInterrupt):
        pool.pipeline(edited, check_interrupt=interrupt)
    assert pool.stats["patched_layers"] - before == 32, "the interrupt came midway, after 32 layers"
    after = snapshot(pipe)
    assert all(torch.equal(original[k], after[k]) for k in original), "an interrupted patch must leave the plain base"
    pool.pipeline(edited)
    fresh = ModelPool()
    fresh_pipe = fresh.plain(fresh.load("tiny-sdxl", dtype="bf16", device="cpu"))
    fresh.pipeline(ModelRecipe(fresh.load("tiny-sdxl", dtype="bf16", device="cpu"), fused=edited.fused))
    differing = [k for k, v in snapshot(fresh_pipe).items() if not torch.equal(v, snapshot(pipe)[k])]
    assert not differing, f"the same recipe must give the same bits after an interrupt: {differing[:3]}"


def test_backups_keep_the_weights_dtype_and_a_bad_place_is_refused(monkeypatch):
    from loraloom.bases.arch import BaseModelError
    from loraloom.bases.pool import BACKUPS_ENV

    pool = ModelPool(backups="device")  # GPU weights only: CPU weights keep host backups
    base = pool.load("tiny-sd15", dtype="bf16", device="cpu")
    pipe = pool.plain(base)
    pool.pipeline(ModelRecipe(base, fused=(Application(random_lora(pipe, 1), "a"),)))
    backups = next(iter(pool._live.values())).backups
    assert backups and {b.dtype for b in backups.values()} == {torch.bfloat16}, "backups never wider than the weights"
    assert all(b.is_contiguous() and b.device.type == "cpu" for b in backups.values())
    monkeypatch.setenv(BACKUPS_ENV, "disk")
    with pytest.raises(BaseModelError, match=f"{BACKUPS_ENV} 'disk' is not a backup place; valid: host, device"):
        ModelPool()
