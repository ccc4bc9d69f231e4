"""LoadBase -> WeightedBlend -> Fuse -> Sample on Flux and SD3.5: the blend samples as diffusers'
load_lora_weights + set_adapters, the fused branch as the blend, and the plain base afterwards as the
untouched preset. (LoadLoRA's readers for transformer LoRA files come with the LoRA-format work; a test
node hands the graph the LoRA value here.)"""
import pytest
import torch

from loraloom.api import Runtime
from loraloom.bases.presets import build_pipeline, preset_names
from loraloom.graph_runtime import Output, String, node
from loraloom.nodes.common import LORA

STEPS, SIZE, SEED, WEIGHT = 2, 64, 4, 0.7
NEGATIVE = {"tiny-flux": "", "tiny-sd3": "blurry"}


@node(category="test", inputs=[String("preset", "")], outputs=[Output(LORA, "lora")])
class TransformerLoRA:
    """The test LoRA of a DiT preset (see the dit_lora fixture), as LoadLoRA would output it."""

    values: dict = {}

    def execute(self, preset):
        return (self.values[preset],)


def _sample(model, preset):
    return {"class_type": "Sample", "inputs": {"model": model, "prompt": "a red circle", "negative_prompt": NEGATIVE[preset],
                                               "steps": STEPS, "width": SIZE, "height": SIZE, "seed": SEED, "guidance": 3.5}}


def _preview(image):
    return {"class_type": "PreviewImage", "inputs": {"images": image}}


def _diffusers(pipe, preset):
    out = pipe(prompt="a red circle", num_inference_steps=STEPS, width=SIZE, height=SIZE, guidance_scale=3.5,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt",
               **({"negative_prompt": NEGATIVE[preset]} if NEGATIVE[preset] else {}))
    return out.images.float().clamp(0, 1).permute(0, 2, 3, 1)


@pytest.mark.parametrize("preset", preset_names("transformer"))
def test_blend_fuse_and_plain_on_a_transformer(preset, dit_lora, diffusers_with_lora, tmp_path):
    path, lora = dit_lora(preset)
    TransformerLoRA.values[preset] = lora
    rt = Runtime(models_dir=tmp_path / "models", output_dir=tmp_path / "out", nodes=[TransformerLoRA])
    wf = {"1": {"class_type": "LoadBase", "inputs": {"source": preset, "dtype": "fp32", "device": "cpu"}},
          "2": {"class_type": "TransformerLoRA", "inputs": {"preset": preset}},
          "4": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": WEIGHT,
                                                          "text_encoder_weight": 1.0, "block_weights": ""}},
          "5": _sample(["4", 0], preset), "6": _preview(["5", 0]),
          "7": {"class_type": "Fuse", "inputs": {"model": ["4", 0], "lora_scale": 1.0, "adapter_names": ""}},
          "8": _sample(["7", 0], preset), "9": _preview(["8", 0])}
    result = rt.run(wf)
    blend, fused = result.value("5"), result.value("8")
    theirs = _diffusers(diffusers_with_lora(preset, path, WEIGHT), preset)
    assert (theirs - _diffusers(build_pipeline(preset, dtype="fp32", device="cpu"), preset)).abs().max() > 0.02, \
        "the LoRA must visibly change the image"
    assert torch.allclose(blend, theirs, atol=2e-4), f"blend differs from set_adapters by {(blend - theirs).abs().max():.2e}"
    assert torch.equal(fused, blend), "fusing at lora_scale 1 writes the weights the blend wrote"
    plain = rt.run({"1": wf["1"], "5": _sample(["1", 0], preset), "6": _preview(["5", 0])}).value("5")
    assert torch.equal(plain, _diffusers(build_pipeline(preset, dtype="fp32", device="cpu"), preset)), \
        "after the LoRA runs, the plain base samples as the untouched preset"
