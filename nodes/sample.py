"""Sample: materialise a model recipe in the pool and run the diffusers pipeline.

How each architecture's pipeline is called differs in three ways, all decided here from its
description (`lora.arches`, ``Arch.sampling``): which schedulers fit (noise-prediction UNets take
the classic ones; Flux and SD3.5 are flow-matching models and take flow-matching ones), what
``guidance`` means (classifier-free guidance with the negative prompt; Flux dev's distilled guidance,
an input of the model, one model run per step) and whether a negative prompt is taken (not by Flux:
its pipeline would only use one for "true CFG", which these models were not trained for).
"""

from __future__ import annotations

from ..graph_runtime import Combo, Float, InputError, Int, Link, Output, String, current_context, node
from ..lora.arches import ARCHES
from .common import CATEGORY, IMAGE, MODEL, model_pool, weight_input

SCHEDULERS = {
    "default": None,
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
# The schedulers of flow-matching models (Flux, SD3.5), under the UNet names where the method is the
# same. The classic schedulers above would build a noise-prediction schedule for a velocity model.
# Each must sample the schedule the pipeline means, shift included: SD3.5's is a static shift (its
# scheduler config's "shift", 3.0); FluxPipeline computes a resolution-dependent one (mu, from the
# latent token count and the config's base_shift/max_shift/base/max_image_seq_len) and passes it to
# set_timesteps, with its own sigmas where the scheduler is not in a flow-sigmas mode.
# - euler: FlowMatchEulerDiscreteScheduler, the base's own (takes sigmas and mu).
# - dpm++_2m, unipc: DPM-Solver++ 2M and UniPC in their flow mode (use_flow_sigmas, flow_prediction).
#   FluxPipeline then passes mu and no sigmas; with the base's use_dynamic_shifting (copied by
#   from_config) both shift their flow grid by exp(mu) exactly as FlowMatchEuler does (DPM sets
#   flow_shift = exp(mu), UniPC calls the same time_shift). Their static shift is named flow_shift,
#   not shift: make_scheduler copies it, else SD3.5 would sample unshifted.
# - heun: FlowMatchHeunDiscreteScheduler; its set_timesteps takes neither sigmas nor mu, so it only
#   fits a static shift (not on Flux, see Sampling.resolution_shift).
# Not offered: FlowMatchEuler's stochastic_sampling (diffusers' pipelines call scheduler.step without
# the generator, so its noise would not follow the seed) and the karras/exponential/beta sigma
# conversions (they keep only the shifted schedule's end points).
_FLOW_SOLVER = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SCHEDULERS = {
    "default": None,
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", _FLOW_SOLVER),
    "unipc": ("UniPCMultistepScheduler", _FLOW_SOLVER),
}
STATIC_SHIFT_ONLY = frozenset({"heun"})
"""Flow schedulers that cannot take a resolution-dependent shift (mu)."""
# FluxPipeline passes mu also for a base without dynamic shifting (schnell), where FlowMatchEuler and
# UniPC ignore it (keeping the static shift, as meant) but DPM-Solver asserts.
_MU_NEEDS_DYNAMIC = frozenset({"dpm++_2m"})
# The scheduler config keys FluxPipeline (and SD3's dynamic shifting) compute mu from.
_MU_KEYS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


def schedulers_for(arch: str) -> dict:
    """The scheduler table of architecture ``arch``: by name, the class and config overrides."""
    sampling = ARCHES[arch].sampling
    if not sampling.flow_matching:
        return SCHEDULERS
    if sampling.resolution_shift:
        return {name: entry for name, entry in FLOW_SCHEDULERS.items() if name not in STATIC_SHIFT_ONLY}
    return FLOW_SCHEDULERS


def scheduler_entry(name: str, arch: str) -> tuple[str, dict] | None:
    """The class name and config overrides of scheduler ``name`` on architecture ``arch`` (None:
    the base's own). A name the architecture has no scheduler for raises an InputError."""
    table = schedulers_for(arch)
    if name not in table:
        label = ARCHES[arch].label
        why = (f"scheduler {name!r} cannot take {label}'s resolution-dependent shift" if name in FLOW_SCHEDULERS
               else f"scheduler {name!r} is for noise-prediction (UNet) models; {label} is a flow-matching model")
        raise InputError(f"{why} and samples with: {', '.join(table)}.", input="scheduler", value=name,
                         limit=tuple(table), kind="value_not_in_list", fix=f"choose one of: {', '.join(table)}")
    return table[name]


def make_scheduler(name: str, base_scheduler, arch: str):
    """The scheduler called ``name`` for architecture ``arch``, built from ``base_scheduler``'s config
    ("default": that one); see scheduler_entry. A flow scheduler that would not follow this base's
    shift raises an InputError."""
    import diffusers

    entry = scheduler_entry(name, arch)
    if entry is None:
        return base_scheduler
    cls_name, extra = entry
    config = base_scheduler.config
    dynamic = bool(config.get("use_dynamic_shifting"))
    refusal = None
    if name in STATIC_SHIFT_ONLY and dynamic:
        refusal = "it cannot take the resolution-dependent shift this base's scheduler config asks for"
    elif name in _MU_NEEDS_DYNAMIC and ARCHES[arch].sampling.resolution_shift and not dynamic:
        refusal = "DPM-Solver takes the pipeline's shift only from a base with dynamic shifting (as dev has)"
    if refusal:
        choices = [n for n in schedulers_for(arch) if n != name]
        raise InputError(f"scheduler {name!r} does not fit this {ARCHES[arch].label} base: {refusal}.",
                         input="scheduler", value=name, kind="not_supported", fix=f"choose one of: {', '.join(choices)}")
    if extra.get("use_flow_sigmas"):
        extra = {**extra, "flow_shift": config.get("shift", 1.0)}
    scheduler = getattr(diffusers, cls_name).from_config(config, **extra)
    # the pipeline computes mu from these; a class that does not declare them must still carry the base's
    scheduler.register_to_config(**{key: config[key] for key in _MU_KEYS if key in config})
    return scheduler


def guidance_arguments(arch: str, guidance: float, negative_prompt: str) -> dict:
    """The pipeline-call arguments for ``guidance`` and ``negative_prompt`` on architecture ``arch``:
    guidance_scale is classifier-free guidance, or Flux's distilled guidance (the model's guidance
    input). A negative prompt where the architecture takes none is refused by sampling_problems."""
    if ARCHES[arch].sampling.negative_prompt:
        return {"guidance_scale": guidance, "negative_prompt": negative_prompt or None}
    return {"guidance_scale": guidance}


def sampling_problems(arch: str, inputs: dict) -> dict[str, InputError]:
    """What architecture ``arch`` refuses among a Sample's ``inputs``, by input name: a width or height
    that is no multiple of its pixel blocks (Flux's pipeline would silently resize the image, SD3's
    raise), a negative prompt where it takes none (never ignored), a scheduler it has none of.
    An input absent from ``inputs`` is not judged. Validation runs this where the base's architecture
    is known before anything runs; Sample runs it again on the loaded base."""
    described, sampling = ARCHES[arch], ARCHES[arch].sampling
    problems = {}
    multiple = sampling.pixel_multiple
    for name in ("width", "height"):
        value = inputs.get(name)
        if isinstance(value, int) and value % multiple:
            problems[name] = InputError(
                f"{value} is not a multiple of {multiple}: {described.label} works on {multiple}x{multiple} pixel "
                "blocks (8x8 for the VAE, then 2x2 latent patches).", input=name, value=value,
                limit=f"a multiple of {multiple}", kind=f"not_multiple_of_{multiple}",
                fix=f"use {value - value % multiple} or {value - value % multiple + multiple}")
    negative = inputs.get("negative_prompt")
    if not sampling.negative_prompt and isinstance(negative, str) and negative:
        problems["negative_prompt"] = InputError(
            f"{described.label} takes no negative prompt: its guidance is distilled into the model (the "
            "guidance input), one model run per step without an unconditional one.", input="negative_prompt",
            value=negative[:80], kind="not_supported", fix="leave negative_prompt empty")
    if isinstance(inputs.get("scheduler"), str):
        try:
            scheduler_entry(inputs["scheduler"], arch)
        except InputError as exc:
            problems["scheduler"] = exc
    return problems


@node(id="LoraLoomSample", aliases=("Sample",), category=f"{CATEGORY}/sampling", display_name="Loom Sample",
      inputs=[Link("model", MODEL),
              String("prompt", "a photo of a cat", multiline=True),
              String("negative_prompt", "", multiline=True),
              Int("seed", 0, min=0, max=2**63 - 1),
              Int("steps", 20, min=1, max=500),
              Float("guidance", 7.0, min=0.0, max=50.0, step=0.1),
              Int("width", 512, min=64, max=8192, step=8),
              Int("height", 512, min=64, max=8192, step=8),
              Combo("scheduler", list(SCHEDULERS), "default"),
              Int("batch_size", 1, min=1, max=64),
              weight_input("lora_scale",
                           tooltip="multiplies the LoRAs that are not fused (diffusers' cross_attention_kwargs scale)")],
      outputs=[Output(IMAGE, "image")])
class Sample:
    """Generate images. Same inputs, same image; progress per step; interruptible between steps.
    On Flux, guidance is the distilled guidance (3.5 is dev's usual value) and the negative prompt
    must be empty; Flux and SD3.5 take the flow-matching schedulers (default, euler, dpm++_2m,
    unipc; heun on SD3.5, whose shift is static) and sizes that are multiples of 16."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        problems = {name: InputError(f"{constants[name]} is not a multiple of 8 (the VAE works on 8x8 pixel blocks)",
                                     value=constants[name], limit="a multiple of 8", kind="not_multiple_of_8")
                    for name in ("width", "height") if isinstance(constants.get(name), int) and constants[name] % 8}
        for name, problem in cls._check_pixels(constants).items():
            # a size's own problem keeps its input; the limit over all three is then the node's problem
            problems[None if name in problems else name] = problem
        if constants.get("scheduler") == "pndm" and isinstance(constants.get("steps"), int) and constants["steps"] < 4:
            problems["steps"] = InputError(f"{constants['steps']} is below 4, the fewest steps the pndm scheduler can "
                                           "take", value=constants["steps"], limit=4, kind="too_few_steps")
        return problems

    @classmethod
    def check_upstream(cls, constants: dict, upstream: dict) -> dict:
        arch = upstream.get("model", {}).get("arch")
        return sampling_problems(arch, constants) if arch in ARCHES else {}

    @staticmethod
    def _check_pixels(constants: dict) -> dict:
        # Memory and time grow with the pixels made at once; the runtime's limits bound them.
        sizes = [constants.get(name) for name in ("width", "height", "batch_size")]
        if not all(isinstance(v, int) for v in sizes):
            return {}
        width, height, batch = sizes
        limits = current_context().limits
        if width * height * batch <= limits.max_pixels:
            return {}
        pixels = width * height * batch
        return {"batch_size" if batch > 1 else "width": InputError(
            f"width x height x batch_size = {width} x {height} x {batch} = {pixels} pixels is above the limit "
            f"{limits.max_pixels}.", value=pixels, limit=limits.max_pixels, kind="too_many_pixels",
            fix=limits.fix("max_pixels"))}

    def execute(self, model, prompt, negative_prompt, seed, steps, guidance, width, height, scheduler,
                batch_size, lora_scale):
        import torch

        ctx = current_context()
        # a view of the base for this sample alone: its scheduler is set here and nowhere else
        arch = model.base.arch
        # refused inputs are refused before any work (validation did where it knew the architecture)
        problems = sampling_problems(arch, {"width": width, "height": height, "negative_prompt": negative_prompt,
                                            "scheduler": scheduler})
        if problems:
            raise next(iter(problems.values()))
        call = guidance_arguments(arch, guidance, negative_prompt)
        pipe = model_pool().pipeline(model, lora_scale=lora_scale, check_interrupt=ctx.check_interrupt)
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler, arch)

        def on_step(pipe_, i, _t, kwargs):
            # the model runs per step: two for heun's steps but the first
            ctx.progress(i + 1, pipe_.num_timesteps)
            return kwargs

        with torch.inference_mode():
            out = pipe(prompt=prompt, num_inference_steps=steps, **call, width=width, height=height,
                       num_images_per_prompt=batch_size,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
                       callback_on_step_end=on_step)
        images = out.images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous()
        return (images,)
