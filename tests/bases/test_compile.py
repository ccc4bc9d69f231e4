"""bases/pool.py's compile option: torch.compile once; weight changes, LoRA swaps and re-fusing do
not recompile; the base's own UNet stays eager; the inductor cache is where README says and the next
process reuses it.
(The pool's other behaviour is in test_pool.py.)"""

import json
import os
import subprocess
import sys

import pytest
import torch

from loraloom.bases.pool import Application, CompileOptions, ModelPool, ModelRecipe


def _lora(pipe, seed):
    from loraloom.lora.canonical import LoRA, LoRAModule

    component = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    gen = torch.Generator().manual_seed(seed)
    mods = {}
    for name, layer in getattr(pipe, component).named_modules():
        if isinstance(layer, torch.nn.Linear) and "attn" in name:
            out_f, in_f = layer.weight.shape
            mods[name] = LoRAModule(torch.randn(4, in_f, generator=gen) * 0.3, torch.randn(out_f, 4, generator=gen) * 0.3,
                                    alpha=4.0, key=name)
    return LoRA({component: mods}, "derived", fingerprint=f"r{seed}")


def _sample(pipe):
    return pipe(prompt="a cat", num_inference_steps=2, width=64, height=64, guidance_scale=5.0,
                generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images


# tiny-flux: the transformer (19 double + 38 single blocks) compiled once, cold (about a minute here).
@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-flux"])
def test_compiled_matches_eager_and_never_recompiles(preset):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pool = ModelPool()
    base = pool.load(preset, dtype="fp32", device="cpu")
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
            assert graphs >= 1, "the first sample must compile the denoiser"
        assert counters["stats"]["unique_graphs"] == graphs, f"'{name}' recompiled the denoiser"
        assert torch.allclose(compiled[name], eager[name], atol=1e-4), \
            f"'{name}': compiled output differs from eager by {(compiled[name] - eager[name]).abs().max():.2e}"
    assert pool.stats["compiles"] == 1
    assert torch.equal(_sample(pool.pipeline(recipes["swap"])), eager["swap"]), \
        "without compile options the base's own denoiser runs, eager as it was"
    assert not torch.allclose(compiled["blend"], compiled["swap"]), "the swap must change the output"


# One process of the real Compile path: the Compile node on the smallest preset, one step at 64 px,
# then torch's cache counters and where the cache went, as JSON on the last line.
_COMPILE_RUN = """
import json, os, tempfile
import torch
from loraloom import Runtime
from torch._dynamo.utils import counters  # after loraloom, which reads the variable before torch sets it
torch.set_num_threads(1)
workflow = {
    "1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "config": "auto", "dtype": "fp32", "device": "cpu"}},
    "2": {"class_type": "Compile", "inputs": {"model": ["1", 0], "mode": "default", "fullgraph": False,
                                              "dynamic": False, "channels_last": False}},
    "3": {"class_type": "Sample", "inputs": {"model": ["2", 0], "prompt": "a cat", "negative_prompt": "", "seed": 1,
                                             "steps": 1, "guidance": 5.0, "width": 64, "height": 64,
                                             "scheduler": "default", "batch_size": 1, "lora_scale": 1.0}},
    "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
}
Runtime(output_dir=tempfile.mkdtemp()).run(workflow)
print(json.dumps({"cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "graphs": counters["stats"]["unique_graphs"],
                  **counters["inductor"], **counters["aot_autograd"]}))
"""


def test_the_inductor_cache_is_in_the_user_cache_and_the_next_process_reuses_it(tmp_path):
    """README: without $TORCHINDUCTOR_CACHE_DIR the cache is ~/.cache/loraloom/inductor (under
    $XDG_CACHE_HOME when set), not torch's temp folder, and a second process compiles nothing: every
    graph is a hit in inductor's FX graph cache and in AOTAutograd's cache."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), TMPDIR=str(tmp_path / "tmp"))  # tempfile follows TMPDIR
    (tmp_path / "tmp").mkdir()
    expected = tmp_path / "cache" / "loraloom" / "inductor"

    def run() -> dict:
        proc = subprocess.run([sys.executable, "-c", _COMPILE_RUN], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cold = run()
    assert cold["cache_dir"] == str(expected), cold
    assert cold["graphs"] == 1, f"the UNet compiles as one graph, with no recompiles: {cold}"
    assert cold.get("fxgraph_cache_miss", 0) >= 1 and not cold.get("fxgraph_cache_hit"), cold
    assert any(p.is_file() for p in expected.rglob("*")), f"nothing was written to {expected}"
    # torch keeps only its precompiled C++ header in its temp folder default, whatever the variable says
    in_temp = {p.name for p in (tmp_path / "tmp").glob("torchinductor_*/*")}
    assert in_temp <= {"precompiled_headers"}, f"the cache went to torch's temp folder default: {in_temp}"
    warm = run()
    assert warm.get("fxgraph_cache_hit", 0) >= 1 and not warm.get("fxgraph_cache_miss"), \
        f"the second process must reuse every compiled graph: {warm}"
    assert warm.get("autograd_cache_hit", 0) >= 1 and not warm.get("autograd_cache_miss"), warm


def test_the_inductor_cache_goes_where_the_user_says(tmp_path, monkeypatch):
    """$TORCHINDUCTOR_CACHE_DIR as set when LoRA Loom was imported wins over whatever torch wrote
    into it since; without it, the user's cache folder."""
    from loraloom.bases.pool import inductor_cache_dir, use_inductor_cache_dir
    from loraloom.graph_runtime import paths

    monkeypatch.setattr(paths, "INDUCTOR_CACHE_AT_IMPORT", str(tmp_path / "mine"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_default")
    assert use_inductor_cache_dir() == tmp_path / "mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.setattr(paths, "INDUCTOR_CACHE_AT_IMPORT", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert inductor_cache_dir() == tmp_path / "xdg" / "loraloom" / "inductor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert inductor_cache_dir() == tmp_path / "home" / ".cache" / "loraloom" / "inductor"
