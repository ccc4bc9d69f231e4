"""The model pool on transformer denoisers (Flux, SD3.5): a diffusers-format LoRA written by
diffusers' own save_lora_weights, applied by weight patching, gives what diffusers'
load_lora_weights + set_adapters gives; fusing matches fuse_lora; restore is bit-exact."""
import pytest
import torch

from loraloom.bases import load_base
from loraloom.bases.export import save_diffusers_folder
from loraloom.bases.pool import Application, ModelPool, ModelRecipe
from loraloom.bases.presets import PRESETS, build_pipeline, preset_names
from loraloom.lora.arches import ARCHES

WEIGHT = 0.7
NEGATIVE = {"tiny-flux": {}, "tiny-sd3": {"negative_prompt": "blurry"}}
DIT_PRESETS = preset_names("transformer")


def _sample(pipe, preset, seed=1):
    return pipe("a red circle", num_inference_steps=2, guidance_scale=3.5, width=64, height=64,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", max_sequence_length=32,
                **NEGATIVE[preset]).images


@pytest.mark.parametrize("preset", DIT_PRESETS)
def test_patched_lora_samples_as_diffusers_adapters(preset, dit_lora, diffusers_with_lora):
    path, lora = dit_lora(preset)
    reference = diffusers_with_lora(preset, path, WEIGHT)
    pool = ModelPool()
    base = pool.load(preset, dtype="fp32", device="cpu")
    assert base.arch == PRESETS[preset].arch
    plain = _sample(pool.plain(base), preset)
    ours = _sample(pool.pipeline(ModelRecipe(base, adapters=(Application(lora, "x", WEIGHT),))), preset)
    theirs = _sample(reference, preset)
    assert len(lora.components["transformer"]) == len(
        [m for m in reference.transformer.modules() if hasattr(m, "lora_A") and len(m.lora_A)]), "every module applied"
    assert (theirs - plain).abs().max() > 0.02, "the LoRA must visibly change the image"
    # patched weights (W + delta) vs diffusers' unfused branch (x A^T B^T): rounding differs, as on SDXL
    assert torch.allclose(ours, theirs, atol=2e-4), f"pool differs from set_adapters by {(ours - theirs).abs().max():.2e}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", DIT_PRESETS)
def test_fuse_matches_fuse_lora_and_restore_is_bit_exact(preset, dtype, dit_lora, diffusers_with_lora):
    path, lora = dit_lora(preset)
    pool = ModelPool()
    base = pool.load(preset, dtype=dtype, device="cpu")
    transformer = pool.plain(base).transformer
    original = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    for i in range(3):  # fuse cycles at changing weights, with an unfused LoRA on top
        pool.pipeline(ModelRecipe(base, fused=(Application(lora, "x", WEIGHT + i / 10),),
                                  adapters=(Application(lora, "y", -0.5),)), lora_scale=0.5)
    pool.pipeline(ModelRecipe(base, fused=(Application(lora, "x", WEIGHT),)))
    fused = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    if dtype == "fp32":
        theirs = diffusers_with_lora(preset, path, WEIGHT, fuse=True)
        compared = 0
        for name, module in theirs.transformer.named_modules():
            if hasattr(module, "base_layer"):
                torch.testing.assert_close(fused[f"{name}.weight"], module.base_layer.weight.detach(), atol=1e-6,
                                           rtol=1e-5, msg=f"{name}: ours vs fuse_lora")
                compared += 1
        assert compared == len(lora.components["transformer"])
    assert any(not torch.equal(fused[n], original[n]) for n in original), "fusing must change weights"
    pool.plain(base)
    changed = [n for n, p in transformer.named_parameters() if not torch.equal(p.detach(), original[n])]
    assert not changed, f"{preset} {dtype}: {len(changed)} parameters differ after restore, e.g. {changed[:3]}"


@pytest.mark.parametrize("preset", DIT_PRESETS)
def test_the_pool_spec_is_the_transformer_and_the_loaders_arch(preset, dit_lora):
    _path, lora = dit_lora(preset)
    pool = ModelPool()
    spec = pool.spec(pool.load(preset, dtype="fp32", device="cpu"))
    assert spec.arch == PRESETS[preset].arch, "T5 as text_encoder_2 must not make Flux look like SDXL"
    assert set(lora.components["transformer"]) <= set(spec.components["transformer"])
    assert set(spec.components) == set(ARCHES[spec.arch].components) == {"transformer", *ARCHES[spec.arch].text_encoders}


@pytest.mark.parametrize("preset", DIT_PRESETS)
def test_saved_pipeline_holds_the_fused_transformer(preset, dit_lora, tmp_path):
    """pipeline_to_save (SavePipeline's view) writes the transformer with the LoRA fused; the folder
    loads back through the checked path to exactly those weights."""
    _path, lora = dit_lora(preset)
    pool = ModelPool()
    base = pool.load(preset, dtype="fp32", device="cpu")
    view = pool.pipeline_to_save(ModelRecipe(base, fused=(Application(lora, "x", WEIGHT),)))
    fused = {n: t.detach().clone() for n, t in view.transformer.state_dict().items()}
    folder = save_diffusers_folder(view, tmp_path / "saved")
    loaded = load_base(folder, dtype="fp32", device="cpu").pipeline.transformer.state_dict()
    assert loaded.keys() == fused.keys()
    assert all(torch.equal(loaded[n], fused[n]) for n in fused), "the saved transformer is the fused one"
    plain = build_pipeline(preset, dtype="fp32", device="cpu").transformer.state_dict()
    assert any(not torch.equal(loaded[n], plain[n]) for n in plain), "the LoRA is in the saved weights"
