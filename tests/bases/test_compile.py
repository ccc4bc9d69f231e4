"""bases/pool.py's compile option: torch.compile once; weight changes, LoRA swaps and re-fusing do
not recompile; the base's own UNet stays eager; the inductor cache is torch's own, where README says.
(The pool's other behaviour is in test_pool.py.)"""

import getpass
import os
import subprocess
import sys
from pathlib import Path

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
    assert torch.equal(_sample(pool.pipeline(recipes["swap"])), eager["swap"]), \
        "without compile options the base's own UNet runs, eager as it was"
    assert not torch.allclose(compiled["blend"], compiled["swap"]), "the swap must change the output"


def test_the_inductor_cache_is_where_readme_says(tmp_path):
    """README: LoRA Loom leaves the cache to torch: $TORCHINDUCTOR_CACHE_DIR, else torchinductor_<user>
    in the temp folder. A compile in a fresh process that went through the pool writes there."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)  # tempfile.gettempdir() follows it
    code = (
        "import torch\n"
        "from loraloom.bases.pool import CompileOptions, ModelPool, ModelRecipe\n"
        "pool = ModelPool()\n"
        "base = pool.load('tiny-sd15', dtype='fp32', device='cpu')\n"
        "pool.pipeline(ModelRecipe(base, compile=CompileOptions(channels_last=True)))\n"
        "torch.compile(lambda x: x.sin() + 1)(torch.ones(4))\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=600)
    cache = Path(tmp_path) / f"torchinductor_{getpass.getuser()}"
    assert cache.is_dir() and any(p.is_file() for p in cache.rglob("*")), \
        f"no compile artifacts in {cache}: {sorted(p.name for p in Path(tmp_path).iterdir())}"
