"""LoadBase -> LoadLoRA -> WeightedBlend -> Fuse -> Sample on Flux and SD3.5: every LoRA layout the
fixtures write loads through LoadLoRA, covers the base fully and changes the image; a diffusers-format
file blends as diffusers' load_lora_weights + set_adapters, the fused branch as the blend, and the plain
base afterwards samples as the untouched preset. A LoRA for another architecture is refused by name."""
import pytest
import torch
from safetensors import safe_open

from loraloom.api import Runtime
from loraloom.bases.presets import build_pipeline, preset_names
from loraloom.fixtures import DIT_FORMATS
from loraloom.graph_runtime import ExecutionError
from loraloom.lora.writers import atomic_save

STEPS, SIZE, SEED, WEIGHT = 2, 64, 4, 0.7
NEGATIVE = {"tiny-flux": "", "tiny-sd3": "blurry"}
ARCH = {"tiny-flux": "flux", "tiny-sd3": "sd3"}
# diffusers' pipelines load no LoRA into T5 (Flux's text_encoder_2, SD3's text_encoder_3): it drops
# those keys without a word; LoadLoRA reads and applies them
T5 = {"tiny-flux": "text_encoder_2", "tiny-sd3": "text_encoder_3"}


def _sample(model, preset):
    return {"class_type": "Sample", "inputs": {"model": model, "prompt": "a red circle", "negative_prompt": NEGATIVE.get(preset, ""),
                                               "steps": STEPS, "width": SIZE, "height": SIZE, "seed": SEED, "guidance": 3.5}}


def _preview(image):
    return {"class_type": "PreviewImage", "inputs": {"images": image}}


def _diffusers(pipe, preset):
    out = pipe(prompt="a red circle", num_inference_steps=STEPS, width=SIZE, height=SIZE, guidance_scale=3.5,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt",
               **({"negative_prompt": NEGATIVE[preset]} if NEGATIVE[preset] else {}))
    return out.images.float().clamp(0, 1).permute(0, 2, 3, 1)


def _blend_wf(preset, lora_name, weight=WEIGHT, te_weight=WEIGHT):
    return {"1": {"class_type": "LoadBase", "inputs": {"source": preset, "dtype": "fp32", "device": "cpu"}},
            "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora_name}},
            "4": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": weight,
                                                            "text_encoder_weight": te_weight, "block_weights": ""}},
            "5": _sample(["4", 0], preset), "6": _preview(["5", 0])}


_PLAIN: dict[str, torch.Tensor] = {}


def _plain(preset):
    """The untouched preset's image, sampled by diffusers (once per preset)."""
    if preset not in _PLAIN:
        _PLAIN[preset] = _diffusers(build_pipeline(preset, dtype="fp32", device="cpu"), preset)
    return _PLAIN[preset]


@pytest.mark.parametrize("preset", preset_names("transformer"))
def test_blend_fuse_and_plain_on_a_transformer(preset, dit_lora, diffusers_with_lora, tmp_path):
    path, _lora = dit_lora(preset)  # written by diffusers' own save_lora_weights
    rt = Runtime(lora_dirs=[path.parent], models_dir=tmp_path / "models", output_dir=tmp_path / "out")
    wf = _blend_wf(preset, path.name, te_weight=1.0)
    wf.update({"7": {"class_type": "Fuse", "inputs": {"model": ["4", 0], "lora_scale": 1.0, "adapter_names": ""}},
               "8": _sample(["7", 0], preset), "9": _preview(["8", 0])})
    result = rt.run(wf)
    blend, fused = result.value("5"), result.value("8")
    theirs = _diffusers(diffusers_with_lora(preset, path, WEIGHT), preset)
    assert (theirs - _plain(preset)).abs().max() > 0.02, "the LoRA must visibly change the image"
    assert torch.allclose(blend, theirs, atol=2e-4), f"blend differs from set_adapters by {(blend - theirs).abs().max():.2e}"
    assert torch.equal(fused, blend), "fusing at lora_scale 1 writes the weights the blend wrote"
    plain = rt.run({"1": wf["1"], "5": _sample(["1", 0], preset), "6": _preview(["5", 0])}).value("5")
    assert torch.equal(plain, _plain(preset)), "after the LoRA runs, the plain base samples as the untouched preset"


@pytest.mark.parametrize("preset,fmt", [(p, f) for p in preset_names("transformer") for f in DIT_FORMATS[ARCH[p]]])
def test_every_dit_lora_format_blends_through_the_nodes(preset, fmt, runtime):
    from loraloom.lora.match import check_lora
    from loraloom.nodes.common import model_pool

    result = runtime.run(_blend_wf(preset, runtime.names[f"{preset}/{fmt}"]))
    lora, base = result.value("2"), result.value("1")
    report = check_lora(lora, model_pool().spec(base.base))
    assert report.fraction == 1.0 and not report.unmatched and report.total == lora.n_modules > 40, report.summary()
    change = (result.value("5") - _plain(preset)).abs().max()
    assert change > 0.02, f"{preset}/{fmt}: the LoRA must visibly change the image (max change {change:.2e})"


@pytest.mark.parametrize("preset", preset_names("transformer"))
def test_fixture_diffusers_file_blends_as_diffusers(preset, runtime, tmp_path):
    # the fixture file carries LoRAs on every encoder; diffusers loads none into T5 (checked here), so
    # the comparison runs on the same file without its T5 keys
    source = runtime.folders.lora_dirs[0] / runtime.names[f"{preset}/diffusers"]
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    t5_keys = [k for k in tensors if k.startswith(f"{T5[preset]}.")]
    assert t5_keys, "the fixture has T5 LoRAs"
    pipe = build_pipeline(preset, dtype="fp32", device="cpu")
    pipe.load_lora_weights(str(source.parent), weight_name=source.name, adapter_name="whole")
    assert not any(hasattr(m, "lora_A") for m in getattr(pipe, T5[preset]).modules()), "diffusers now loads T5 LoRAs"
    path = atomic_save({k: v for k, v in tensors.items() if k not in t5_keys}, tmp_path / "no-t5.safetensors", metadata)
    rt = Runtime(lora_dirs=[tmp_path], models_dir=tmp_path / "models", output_dir=tmp_path / "out")
    ours = rt.run(_blend_wf(preset, path.name)).value("5")
    pipe = build_pipeline(preset, dtype="fp32", device="cpu")
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="x")
    pipe.set_adapters(["x"], [WEIGHT])
    theirs = _diffusers(pipe, preset)
    assert (theirs - _plain(preset)).abs().max() > 0.02, "the LoRA must visibly change the image"
    assert torch.allclose(ours, theirs, atol=2e-4), f"blend differs from set_adapters by {(ours - theirs).abs().max():.2e}"


@pytest.mark.parametrize("lora,base,named", [("tiny-flux/kohya", "tiny-sdxl", "Flux"),
                                             ("tiny-flux/comfyui", "tiny-sd3", "Flux"),
                                             ("tiny-sdxl/kohya", "tiny-flux", "SDXL")])
def test_lora_for_another_architecture_is_refused_by_name(lora, base, named, runtime):
    with pytest.raises(ExecutionError) as info:
        runtime.run(_blend_wf(base, runtime.names[lora]))
    err = info.value
    assert (err.node_id, err.class_type) == ("4", "WeightedBlend")
    text = str(err)
    assert f"looks made for {named}" in text and runtime.names[lora].split(".")[0] in text, text
    assert f"Fix: load it on {'an' if named == 'SDXL' else 'a'} {named} base" in text, text
