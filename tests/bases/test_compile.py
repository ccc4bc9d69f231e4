"""Compile: torch.compile once; weight changes, LoRA swaps and re-fusing do not recompile."""

import torch

from loraloom.bases.pool import Application, CompileOptions, ModelPool, ModelRecipe


def _lora(pipe, seed):
    from loraloom.lora.canonical import LoRA, LoRAModule

    gen = torch.Generator().manual_seed(seed)
    mods = {}
    for name, layer in pipe.unet.named_modules():
        if isinstance(layer, torch.nn.Linear) and "attn" in name:
            out_f, in_f = layer.weight.shape
            mods[name] = LoRAModule(torch.randn(4, in_f, generator=gen) * 0.3, torch.randn(out_f, 4, generator=gen) * 0.3,
                                    alpha=4.0, key=name)
    return LoRA({"unet": mods}, "derived", fingerprint=f"r{seed}")


def _sample(pipe):
    return pipe(prompt="a cat", num_inference_steps=2, width=64, height=64, guidance_scale=5.0,
                generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images


def test_compiled_matches_eager_and_never_recompiles(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    pool = ModelPool()
    base = pool.load("tiny-sd15", dtype="fp32", device="cpu")
    pipe = pool.plain(base)
    a, b = _lora(pipe, 1), _lora(pipe, 2)
    options = CompileOptions(fullgraph=True)
    recipes = {
        "blend": ModelRecipe(base, adapters=(Application(a, "a", 0.7),)),
        "weight change": ModelRecipe(base, adapters=(Application(a, "a", -0.4),)),
        "swap": ModelRecipe(base, adapters=(Application(b, "b", 0.9),)),
        "re-fuse": ModelRecipe(base, fused=(Application(a, "a", 0.5), Application(b, "b", 0.5))),
    }
    eager = {name: _sample(pool.pipeline(r)) for name, r in recipes.items()}
    compiled = {}
    graphs = None
    for name, recipe in recipes.items():
        compiled[name] = _sample(pool.pipeline(ModelRecipe(recipe.base, recipe.fused, recipe.adapters, options)))
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 1, "the first sample must compile the UNet"
        assert counters["stats"]["unique_graphs"] == graphs, f"'{name}' recompiled the UNet"
        assert torch.allclose(compiled[name], eager[name], atol=1e-4), \
            f"'{name}': compiled output differs from eager by {(compiled[name] - eager[name]).abs().max():.2e}"
    assert pool.stats["compiles"] == 1
    assert not torch.allclose(compiled["blend"], compiled["swap"]), "the swap must change the output"
