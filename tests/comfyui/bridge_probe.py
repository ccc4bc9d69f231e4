"""Run by test_bridge.py with ComfyUI's Python, cwd at the ComfyUI folder: ComfyUI's own model with
our bridge's patches, read back from inside ComfyUI.

Argument: a JSON file with ``checkpoint``, ``lora`` (a LoRA file), ``strength_model``,
``strength_clip``, ``block_weights``, ``inputs`` (a safetensors file: ``x``, ``t``, ``context`` for
the denoiser) and ``out``. Writes to ``out`` (safetensors) every weight ComfyUI's own patching
changed (loaded as sampling loads a model: `comfy.model_management.load_models_gpu`), minus the base
weight, under our module names (``unet.<diffusers key>``, ``text_encoder.<key>``), and the
denoiser's output on the inputs with the patches (``denoiser_lora``) and without
(``denoiser_base``, the input model loaded again after the patched one); prints the bridge's report.

ComfyUI runs here with ``--fp32-text-enc``: on a CPU it keeps the text encoder in float16 by default
and rounds a patched weight to float16 (stochastically), which would hide the float32 comparison.
"""

import json
import sys
from pathlib import Path

args = json.loads(Path(sys.argv[1]).read_text())
sys.argv = [sys.argv[0], "--cpu", "--fp32-text-enc"]
sys.path.insert(0, ".")

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loraloom.lora.readers import read_lora  # noqa: E402
from loraloom.nodes.comfy_bridge import ApplyLoRA  # noqa: E402

model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args["checkpoint"], output_vae=False, output_clip=True)
as_read = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
done = ApplyLoRA().execute(model, read_lora(args["lora"]), args["strength_model"], args["strength_clip"],
                           args["block_weights"], clip=clip)
new_model, new_clip = done["result"]
inputs = load_file(args["inputs"])


def loaded(patcher) -> dict:
    """The weights of ``patcher``'s model as ComfyUI loads it to run (its patches applied)."""
    comfy.model_management.load_models_gpu([patcher])
    return {k: v.detach().float().clone() for k, v in patcher.model.state_dict().items()}


def denoise(patcher):
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.diffusion_model(inputs["x"], timesteps=inputs["t"], context=inputs["context"]).clone()


def deltas(base_patcher, patcher, rename) -> dict:
    base = loaded(base_patcher)
    patched = loaded(patcher)
    return {rename(k): (patched[k] - base[k]).contiguous() for k in patcher.patches}


to_diffusers = {"diffusion_model." + ldm: "unet." + key
                for key, ldm in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()}
unet = deltas(model, new_model, lambda k: to_diffusers[k])
text = deltas(clip.patcher, new_clip.patcher, lambda k: "text_encoder." + k.removeprefix("clip_l.transformer.text_model."))
denoiser_lora = denoise(new_model)
denoiser_base = denoise(model)
unchanged = all(torch.equal(as_read[k].float(), v) for k, v in loaded(model).items())  # after the patched one ran
save_file({**unet, **text, "denoiser_lora": denoiser_lora, "denoiser_base": denoiser_base}, args["out"])
print(json.dumps({"report": done["ui"]["text"][0], "unpatched_after": unchanged,
                  "input_patches": len(model.patches), "input_clip_patches": len(clip.patcher.patches)}))
