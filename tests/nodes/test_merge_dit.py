"""PeftMerge on Flux and SD3.5 (tiny-flux, tiny-sd3): transformer LoRAs merged through the nodes equal
peft's own add_weighted_adapter on the preset's transformer, all eleven methods, for LoRAs of equal ranks
on different target sets (one lacks whole blocks and some projections) and of different ranks on
different target sets; DARE equals peft given peft's RNG state; SaveLoRA writes a Flux and an SD3.5
merge in diffusers and kohya layouts that read back equal."""

import copy
import math
import re

import pytest
import torch

from loraloom.api import Runtime
from loraloom.lora.canonical import LoRA, LoRAModule
from loraloom.lora.readers import read_lora
from loraloom.lora.writers import write_diffusers

DENSITY, WEIGHTS = 0.5, (1.0, -0.6)
# the pair of LoRAs of different ranks on different targets, per preset (file names in `pairs`)
UNEQUAL = {"tiny-flux": ("diffusers.safetensors", "xlabs.safetensors"),
           "tiny-sd3": ("diffusers.safetensors", "second.safetensors")}  # fmt: skip
EQUAL = ("first.safetensors", "second.safetensors")
# blocks the second LoRA of the equal pair lacks altogether (joint / double-stream and single-stream)
LACKING = {f"transformer_blocks.{i}" for i in range(12, 19)} | {f"single_transformer_blocks.{i}" for i in range(30, 38)}


@pytest.fixture(scope="module")
def pairs(dit_lora, dit_files, dit_pipelines, tmp_path_factory):
    """pairs(preset) -> a folder holding, for that preset: ``first``: diffusers' own rank-4 file
    (alpha 8); ``second``: a rank-4 LoRA (alpha 2) without the first's feed-forward and single-block
    MLP modules and without the blocks in LACKING, plus two modules the first lacks; ``diffusers``: the diffusers-layout fixture (ranks 4
    and 8); ``xlabs`` (Flux): the XLabs fixture (attention only). EQUAL and UNEQUAL name the pairs."""
    made = {}

    def get(preset):
        if preset in made:
            return made[preset]
        path, first = dit_lora(preset)
        folder = tmp_path_factory.mktemp(f"{preset}-merge")
        gen = torch.Generator().manual_seed(21)
        modules = {}
        for p, m in first.components["transformer"].items():
            if ".ff." in p or "proj_mlp" in p or _block(p) in LACKING:
                continue
            modules[p] = LoRAModule(down=torch.randn(m.down.shape, generator=gen) / math.sqrt(m.down.shape[1]),
                                    up=torch.randn(m.up.shape, generator=gen) * 0.3, alpha=2.0)
        transformer = dit_pipelines[preset].transformer
        for p in ("context_embedder", "transformer_blocks.0.norm1.linear"):
            rows, cols = transformer.get_submodule(p).weight.shape
            modules[p] = LoRAModule(down=torch.randn(4, cols, generator=gen) / math.sqrt(cols),
                                    up=torch.randn(rows, 4, generator=gen) * 0.3, alpha=2.0)
        write_diffusers(LoRA({"transformer": modules}, source_format="derived", fingerprint="b" * 64),
                        folder / "second.safetensors")
        (folder / "first.safetensors").write_bytes(path.read_bytes())
        for fmt in ("diffusers", "xlabs"):
            if f"{preset}/{fmt}" in dit_files:
                (folder / f"{fmt}.safetensors").write_bytes(dit_files[f"{preset}/{fmt}"].read_bytes())
        made[preset] = folder
        return folder

    return get


def _merge_wf(names, method):
    return {"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": names[0]}},
            "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": names[1]}},
            "3": {"class_type": "PeftMerge", "inputs": {"lora_a": ["1", 0], "weight_a": WEIGHTS[0], "lora_b": ["2", 0],
                                                        "weight_b": WEIGHTS[1], "method": method, "density": DENSITY,
                                                        "seed": 5}},
            "4": {"class_type": "SaveLoRA", "inputs": {"lora": ["3", 0], "filename_prefix": "loras/merged",
                                                       "format": "diffusers", "dtype": "fp32"}}}


@pytest.fixture(scope="module")
def runtimes(pairs, tmp_path_factory):
    """runtimes(preset) -> a Runtime over that preset's pair folder, one per module (its cache keeps the
    loaded LoRAs between tests)."""
    made = {}

    def get(preset):
        if preset not in made:
            out = tmp_path_factory.mktemp(f"{preset}-runtime")
            made[preset] = Runtime(lora_dirs=[pairs(preset)], models_dir=out / "models", output_dir=out / "out")
        return made[preset]

    return get


@pytest.fixture(scope="module")
def peft_models(pairs, dit_pipelines):
    """peft_models(preset, pair) -> (PeftModel, (a, b)): the preset's transformer with the pair's two
    LoRAs as peft adapters "one" and "two", built once per module; each test adds its merged adapter
    under a name of its own."""
    made = {}

    def get(preset, pair):
        if (preset, pair) not in made:
            loras = tuple(read_lora(pairs(preset) / n) for n in (EQUAL if pair == "equal" else UNEQUAL[preset]))
            made[preset, pair] = (_peft_model(preset, loras, dit_pipelines), loras)
        return made[preset, pair]

    return get


def _peft_model(preset, loras, dit_pipelines):
    """The preset's transformer as a PeftModel with each LoRA's transformer modules as an adapter
    (its own ranks and alphas per module)."""
    from peft import LoraConfig, get_peft_model

    transformer = copy.deepcopy(dit_pipelines[preset].transformer)
    model = None
    for name, lora in zip(("one", "two"), loras):  # not "a"/"b": substrings of peft's "lora_" prefix
        mods = lora.components["transformer"]
        # peft matches a list entry, and a pattern key, as a suffix ("proj_out" would also take every
        # single block's proj_out): anchored regexes name each module alone
        config = LoraConfig(r=max(m.rank for m in mods.values()), lora_alpha=8,
                            target_modules="|".join(f"^{re.escape(p)}$" for p in sorted(mods)),
                            rank_pattern={f"^{re.escape(p)}": m.rank for p, m in mods.items()},
                            alpha_pattern={f"^{re.escape(p)}": m.alpha for p, m in mods.items()})
        model = get_peft_model(transformer, config, adapter_name=name) if model is None else model
        if name != "one":
            model.add_adapter(name, config)
        with torch.no_grad():
            for path, m in mods.items():
                layer = model.base_model.model.get_submodule(path)
                layer.lora_A[name].weight.copy_(m.down)
                layer.lora_B[name].weight.copy_(m.up)
    return model


def _peft_deltas(model, method, paths, name):
    """peft's add_weighted_adapter of "one" and "two" into adapter `name`: {path: merged delta}."""
    model.add_weighted_adapter(["one", "two"], list(WEIGHTS), name, combination_type=method, density=DENSITY)
    out = {}
    for path in paths:
        layer = model.base_model.model.get_submodule(path)
        out[path] = (layer.lora_B[name].weight.flatten(1) @ layer.lora_A[name].weight.flatten(1)) * layer.scaling[name]
    return out


def _worst(merged, theirs):
    assert set(merged.components["transformer"]) == set(theirs), "merged modules differ from peft's"
    worst = 0.0
    for path, expected in theirs.items():
        m = merged.components["transformer"][path]
        ours = m.up.flatten(1) @ m.down.flatten(1) * (m.alpha / m.rank)
        worst = max(worst, ((ours - expected).norm() / expected.norm().clamp_min(1e-12)).item())
    return worst


def _block(path):
    """The block a module path lies in ("transformer_blocks.3"), or the path itself outside the blocks."""
    parts = path.split(".")
    return ".".join(parts[:2]) if parts[0].endswith("blocks") else path


def _check_pair(a, b, pair):
    """The pair is what its name says: different, overlapping targets (equal: b lacks whole blocks a
    has and projections a has in blocks both have, and has modules a lacks); ranks equal or not."""
    ta, tb = set(a.components["transformer"]), set(b.components["transformer"])
    assert ta != tb and ta & tb, "the two LoRAs target different, overlapping module sets"
    if pair == "equal":
        assert tb - ta, "the second LoRA has modules the first lacks"
        blocks_b = {_block(p) for p in tb}
        assert {_block(p) for p in ta} - blocks_b, "the second LoRA lacks whole blocks the first has"
        assert {p for p in ta - tb if _block(p) in blocks_b}, \
            "the second LoRA lacks projections in blocks both have"
    ranks = {m.rank for lora in (a, b) for m in lora.components["transformer"].values()}
    assert (len(ranks) > 1) == (pair == "unequal"), ranks


# every deterministic peft method on both presets for the pair of equal ranks; the methods that accept
# different ranks for the unequal pair (DARE, which draws from peft's RNG, is in the test below)
DETERMINISTIC = ("linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd")
ANY_RANK = ("cat", "svd", "ties_svd", "magnitude_prune_svd")
CASES = [(preset, "equal", m) for preset in UNEQUAL for m in DETERMINISTIC] + \
        [(preset, "unequal", m) for preset in UNEQUAL for m in ANY_RANK]


@pytest.mark.parametrize("preset,pair,method", CASES)
def test_dit_merge_matches_peft_add_weighted_adapter(preset, pair, method, runtimes, peft_models):
    names = EQUAL if pair == "equal" else UNEQUAL[preset]
    result = runtimes(preset).run(_merge_wf(names, method))
    model, (a, b) = peft_models(preset, pair)
    for ours, read in zip((result.value("1"), result.value("2")), (a, b)):
        assert [(p, m.rank) for _, p, m in ours.modules()] == [(p, m.rank) for _, p, m in read.modules()]
    _check_pair(a, b, pair)
    paths = sorted(set(a.components["transformer"]) | set(b.components["transformer"]))
    worst = _worst(result.value("3"), _peft_deltas(model, method, paths, f"m_{method}"))
    assert worst < 1e-3, f"{preset} {pair} {method}: worst relative difference from peft per module {worst:.2e}"


DARE = [("tiny-flux", "equal", m) for m in ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")] + \
       [("tiny-sd3", "equal", m) for m in ("dare_linear", "dare_ties", "dare_ties_svd")] + \
       [("tiny-sd3", "unequal", "dare_linear_svd")]


@pytest.mark.parametrize("preset,pair,method", DARE)
def test_dit_dare_matches_peft_given_its_rng_state(preset, pair, method, peft_models, peft_dare_state):
    """DARE draws its masks at random: given the global RNG state at peft's first draw (and seed None,
    which draws from it in peft's module order), our merge equals peft's."""
    from loraloom.lora.merge import Factors, MergeOptions, merge_loras

    model, (a, b) = peft_models(preset, pair)
    _check_pair(a, b, pair)
    paths = [n for n, _ in model.base_model.model.named_modules()
             if n in a.components["transformer"] or n in b.components["transformer"]]  # peft's draw order
    torch.manual_seed(99)
    theirs = _peft_deltas(model, method, paths, f"m_{method}")
    assert peft_dare_state, "peft's DARE draws were not observed"

    def factors(lora, path):
        m = lora.components["transformer"].get(path)
        return None if m is None else Factors(m.down, m.up, m.alpha / m.rank)

    torch.set_rng_state(peft_dare_state[0])
    result = merge_loras(method, {p: [factors(a, p), factors(b, p)] for p in paths}, list(WEIGHTS),
                         MergeOptions(seed=None, density=DENSITY))
    merged = LoRA({"transformer": {p: LoRAModule(down=f.down, up=f.up, alpha=float(f.down.shape[0]))
                                   for p, f in result.modules.items()}}, "derived", fingerprint="m" * 64)
    worst = _worst(merged, theirs)
    limit = 1e-3 if method.endswith("_svd") else 1e-6  # the SVD forms: truncated SVDs, as for the others
    assert worst < limit, f"{preset} {pair} {method}: worst relative difference from peft per module {worst:.2e}"


@pytest.mark.parametrize("preset,fmt", [(p, f) for p in UNEQUAL for f in ("diffusers", "kohya")])
def test_saved_dit_merge_reads_back_equal(preset, fmt, pairs, tmp_path):
    """SaveLoRA writes a merge in diffusers' layout and in the kohya layout of the original modules
    (Flux's fused qkv / linear1, SD3's joint blocks): both read back to the merged modules, bit for bit."""
    rt = Runtime(lora_dirs=[pairs(preset)], models_dir=tmp_path / "models", output_dir=tmp_path / "out")
    wf = _merge_wf(UNEQUAL[preset], "svd")
    wf["4"]["inputs"]["format"] = fmt
    result = rt.run(wf)
    merged = result.value("3")
    ref = result.outputs["4"]["loras"][0]
    saved = read_lora(tmp_path / "out" / ref["subfolder"] / ref["filename"])
    kohya = "kohya-flux" if preset == "tiny-flux" else "kohya-sd3"
    assert saved.source_format == (kohya if fmt == "kohya" else "diffusers"), saved.source_format
    assert [(c, p) for c, p, _ in saved.modules()] == [(c, p) for c, p, _ in merged.modules()]
    for c, p, m in merged.modules():
        s = saved.components[c][p]
        assert torch.equal(s.down, m.down) and torch.equal(s.up, m.up) and s.alpha == m.alpha, f"{c}.{p}"
