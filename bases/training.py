"""Train the `tiny-sdxl-shapes` preset and its demo LoRAs on pictures this module draws itself.

The data: 64 px pictures of one shape (circle, square, triangle) in one of six colours, plain,
striped or dotted, at a random place and size on a light background, captioned like
"a red circle, striped". Nothing is downloaded.

The base (`train_base`) is the `tiny-sdxl` architecture: its text encoders stay at their seeded
init, rounded to fp16 (a byte-level tokenizer plus a random CLIP still gives every caption its own
embedding, and it costs nothing to train); the VAE is trained as a plain autoencoder (L1 + MSE and
a small KL term) and its latent scale measured; then the UNet learns epsilon prediction on the
preset's noise schedule from latents of those pictures, with 10% empty captions for
classifier-free guidance, min-SNR loss weighting and an EMA of its weights. The demo LoRAs
(`train_lora`) are peft LoRAs on the UNet's attention and feed-forward layers trained on the same
captions with one property forced: every picture red ("red"), or every picture striped ("stripes");
they are written in kohya format.

The shipped files were made with these commands, about 35 minutes of one CPU core in all (batch 32;
VAE 0.45 s a step, UNet 0.5-0.65 s, LoRA 0.5-0.7 s, on a 2-core machine shared with other work):

    python -m loraloom.bases.training base /tmp/stage1.safetensors --vae-steps 800 --unet-steps 1500
    python -m loraloom.bases.training base bases/weights/tiny-sdxl-shapes.safetensors \
        --resume /tmp/stage1.safetensors --unet-steps 1000 --lr 5e-4 --seed 1
    python -m loraloom.bases.training loras bases/weights/tiny-sdxl-shapes.safetensors workflows/loras

(after 1500 steps the colours were right but red came out orange and no shape was recognisable;
1000 more made them recognisable). Then set presets.SHAPES_VAE_SCALING to the scale the first
command prints. One thread by default: on a busy 2-core machine torch's second thread mostly waits
at barriers (a UNet step measured 0.47 s with one thread, 2-8 s with two, while other processes ran).
The SDXL layout, not SD1.5's, because the shipped workflows are SDXL and SD1.5 was not much cheaper
(0.36 s a step against 0.47 s, measured alike).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..lora.canonical import LoRA, LoRAModule, derived_fingerprint
from ..lora.writers import atomic_save, write_kohya
from . import presets

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.65, 0.2),
    "blue": (0.1, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.55, 0.15, 0.75),
    "orange": (1.0, 0.5, 0.0),
}
TEXTURES = ("plain", "striped", "dotted")
BACKGROUND = 0.92
SIZE = 64
# SDXL's micro-conditioning as the pipeline sends it for a 64 px image: original size, crop, target size
_TIME_IDS = (SIZE, SIZE, 0, 0, SIZE, SIZE)
LORA_KINDS = {"red": {"colour": "red"}, "stripes": {"texture": "striped"}}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def caption(shape: str, colour: str, texture: str) -> str:
    """The caption of one picture: "a red circle", "a blue square, striped"."""
    return f"a {colour} {shape}" + ("" if texture == "plain" else f", {texture}")


def render(shape: str, colour: str, texture: str, cx: float, cy: float, radius: float) -> torch.Tensor:
    """One 3 x 64 x 64 picture in [-1, 1]: the shape centred at (cx, cy) in pixels, `radius` its
    half-size; stripes and dots are a dark shade of the colour, 16 px apart (two latent cells: the
    VAE's x8 latent can hold them)."""
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32) + 0.5,
                          torch.arange(SIZE, dtype=torch.float32) + 0.5, indexing="ij")
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
    elif shape == "square":
        half = radius * 0.85
        mask = ((x - cx).abs() < half) & ((y - cy).abs() < half)
    else:  # an upward triangle: apex at the top, base at the bottom
        top, bottom = cy - radius, cy + radius * 0.8
        mask = (y > top) & (y < bottom) & ((x - cx).abs() < (y - top) * 0.6)
    fill = torch.tensor(COLOURS[colour]).view(3, 1, 1).expand(3, SIZE, SIZE).clone()
    if texture == "striped":
        dark = ((y // 8) % 2 == 1).unsqueeze(0).expand_as(fill)
        fill[dark] *= 0.3
    elif texture == "dotted":
        dark = (((x % 16) - 8) ** 2 + ((y % 16) - 8) ** 2 < 16).unsqueeze(0).expand_as(fill)
        fill[dark] *= 0.3
    image = torch.full((3, SIZE, SIZE), BACKGROUND)
    image = torch.where(mask.unsqueeze(0), fill, image)
    return image * 2 - 1


def make_dataset(count: int, seed: int, force: dict[str, str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """`count` pictures (N x 3 x 64 x 64 in [-1, 1]) and their captions, cycling through every
    (shape, colour, texture) so each caption appears about equally often. `force` overrides the
    picture's "colour" or "texture" while the caption keeps the drawn one: what a demo LoRA learns."""
    gen = torch.Generator().manual_seed(seed)
    combos = [(s, c, t) for s in SHAPES for c in COLOURS for t in TEXTURES]
    order = torch.randperm(len(combos) * (count // len(combos) + 1), generator=gen) % len(combos)
    images, captions = [], []
    for index in order[:count].tolist():
        shape, colour, texture = combos[index]
        cx, cy = (20 + 24 * torch.rand(2, generator=gen)).tolist()
        radius = float(12 + 8 * torch.rand(1, generator=gen))
        drawn = {"colour": colour, "texture": texture, **(force or {})}
        images.append(render(shape, drawn["colour"], drawn["texture"], cx, cy, radius))
        captions.append(caption(shape, colour, texture))
    return torch.stack(images), captions


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def skeleton():
    """The tiny-sdxl-shapes pipeline at its seeded init, in eval mode, text encoders rounded to fp16
    as the shipped file keeps them: the starting point of `train_base`."""
    pipe = presets.build_skeleton("tiny-sdxl-shapes")
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    with torch.no_grad():
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            for p in encoder.parameters():
                p.copy_(p.half().float())
    return pipe


def _embed(pipe, captions: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each distinct caption's prompt embeddings and pooled embedding, as the pipeline makes them."""
    table = {}
    with torch.no_grad():
        for text in sorted(set(captions)):
            embeds, _, pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
            table[text] = {"embeds": embeds[0], "pooled": pooled[0]}
    return table


def train_vae(vae, images: torch.Tensor, steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0,
              log_every: int = 100) -> float:
    """Train `vae` in place to reconstruct `images` (random 32 px crops: it is convolutional, and a
    crop costs a quarter of a whole picture); return the latent scaling factor (1 / std of the
    latent means over the whole pictures), as Stable Diffusion measured its own."""
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        ox, oy = (torch.randint(0, 5, (2,), generator=gen) * 8).tolist()  # crops on the latent grid
        x = images[idx][:, :, oy:oy + 32, ox:ox + 32]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            _log(f"vae step {step}/{steps} loss {loss.item():.4f} ({(time.time() - start) / (step + 1):.2f} s/step)")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)])
    return float(1 / latents.std())


def train_unet(pipe, latents: torch.Tensor, captions: Sequence[str], steps: int, *, batch: int = 32,
               lr: float = 1e-3, seed: int = 0, params: Sequence[torch.nn.Parameter] | None = None,
               ema_decay: float | None = 0.999, drop_caption: float = 0.1, log_every: int = 100,
               on_log: Callable[[int], None] | None = None) -> None:
    """Train `pipe.unet` in place on scaled `latents` and their `captions`: epsilon prediction on
    the pipeline's noise schedule, min-SNR (gamma 5) weights, `drop_caption` of the captions
    replaced by the zero embedding the SDXL pipeline uses for an empty negative prompt. `params`:
    what to train (default: every UNet weight). With `ema_decay`, the UNet ends with the EMA weights."""
    from diffusers import DDPMScheduler

    unet = pipe.unet
    table = _embed(pipe, captions)
    embeds = torch.stack([table[c]["embeds"] for c in captions])
    pooled = torch.stack([table[c]["pooled"] for c in captions])
    noise_sched = DDPMScheduler(**presets.SCHEDULER_CONFIG)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    gen = torch.Generator().manual_seed(seed)
    params = list(params) if params is not None else list(unet.parameters())
    ema = [p.detach().clone() for p in params] if ema_decay else None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    time_ids = torch.tensor([_TIME_IDS], dtype=torch.float32).expand(batch, -1)
    unet.train()
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        keep = (torch.rand(batch, generator=gen) >= drop_caption).float()
        cond = embeds[idx] * keep.view(-1, 1, 1)
        added = {"text_embeds": pooled[idx] * keep.view(-1, 1), "time_ids": time_ids}
        pred = unet(xt, t, cond, added_cond_kwargs=added).sample
        weight = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                decay = min(ema_decay, (1 + step) / (10 + step))  # short runs still average
                for e, p in zip(ema, params):
                    e.lerp_(p.detach(), 1 - decay)
        if log_every and (step % log_every == 0 or step == steps - 1):
            _log(f"unet step {step}/{steps} loss {loss.item():.4f} ({(time.time() - start) / (step + 1):.2f} s/step)")
            if on_log is not None:
                on_log(step)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params):
                p.copy_(e)
    unet.eval()


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Scaled latent means of `images`, what the UNet trains on."""
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)])
    return means * vae.config.scaling_factor


def load_trained(path: str | Path):
    """A pipeline holding the weights file `path` (as `save_base` wrote it, not yet shipped)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        scaling = float(f.metadata()["vae_scaling_factor"])
    pipe = skeleton()
    pipe.vae.register_to_config(scaling_factor=scaling)
    return presets.load_weights(pipe, path)


def save_base(pipe, path: str | Path, scaling_factor: float) -> Path:
    """Every weight of the pipeline's four models in fp16, keyed "<component>.<name>"; the latent
    scale goes into the metadata (the preset's VAE config must carry the same number)."""
    tensors = {}
    for component in presets.WEIGHT_COMPONENTS:
        for name, tensor in getattr(pipe, component).state_dict().items():
            tensors[f"{component}.{name}"] = tensor.detach().to(torch.float16).contiguous()
    return atomic_save(tensors, path, {"format": "pt", "vae_scaling_factor": f"{scaling_factor:.5f}"})


def sample_grid(pipe, prompts: Sequence[str], path: str | Path, seed: int = 0, steps: int = 20,
                guidance: float = 5.0, scale: int = 2) -> Path:
    """Sample each prompt at 64 px and save them side by side (nearest-neighbour enlarged x`scale`)."""
    from PIL import Image

    tiles = []
    for prompt in prompts:
        gen = torch.Generator().manual_seed(seed)
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                     generator=gen).images[0]
        tiles.append(image.resize((SIZE * scale, SIZE * scale), Image.NEAREST))
    strip = Image.new("RGB", (SIZE * scale * len(tiles), SIZE * scale))
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * SIZE * scale, 0))
    strip.save(path)
    return Path(path)


CHECK_PROMPTS = ("a red circle", "a blue square, striped", "a green triangle", "a yellow circle, dotted",
                 "a purple square", "an orange triangle, striped")


def train_base(out: str | Path, *, images: int = 4096, vae_steps: int = 800, unet_steps: int = 1500,
               batch: int = 32, seed: int = 0, samples: str | Path | None = None, log_every: int = 100,
               resume: str | Path | None = None, lr: float = 1e-3) -> Path:
    """Train the shapes base and write `out` (the preset's weights file); sample grids go to the
    `samples` folder when given. `resume`: a weights file to go on from (its VAE is kept, only the
    UNet trains further). Returns the written path."""
    torch.manual_seed(seed)
    data, captions = make_dataset(images, seed)
    _log(f"{len(data)} pictures, {len(set(captions))} captions")
    if resume is not None:
        pipe = load_trained(resume)
        scaling = pipe.vae.config.scaling_factor
    else:
        pipe = skeleton()
        scaling = round(train_vae(pipe.vae, data, vae_steps, batch=batch, seed=seed, log_every=log_every), 5)
        pipe.vae.register_to_config(scaling_factor=scaling)
    _log(f"vae latent scaling factor {scaling:.5f}")
    latents = encode_latents(pipe.vae, data)
    samples = Path(samples) if samples else None

    def snapshot(step: int) -> None:
        if samples is not None and step and step % (log_every * 5) == 0:
            pipe.unet.eval()
            sample_grid(pipe, CHECK_PROMPTS, samples / f"base-step{step:05d}.png")
            pipe.unet.train()

    train_unet(pipe, latents, captions, unet_steps, batch=batch, lr=lr, seed=seed, log_every=log_every,
               on_log=snapshot)
    written = save_base(pipe, out, scaling)
    if samples is not None:
        sample_grid(pipe, CHECK_PROMPTS, samples / "base-final.png")
    return written


def _lora_value(unet, rank: int, alpha: float) -> LoRA:
    """The trained peft adapter "default" of `unet` as a LoRA value (module paths as diffusers names them)."""
    modules = {}
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            modules[name] = LoRAModule(down=module.lora_A["default"].weight.detach().clone(),
                                       up=module.lora_B["default"].weight.detach().clone(), alpha=alpha)
    assert modules, "no LoRA layers found"
    return LoRA({"unet": modules}, source_format="derived",
                fingerprint=derived_fingerprint("train_lora", [], {"rank": rank, "alpha": alpha}))


def train_lora(pipe, kind: str, out: str | Path, *, images: int = 2048, steps: int = 300, rank: int = 4,
               batch: int = 32, seed: int = 1, samples: str | Path | None = None, log_every: int = 100) -> Path:
    """Train demo LoRA `kind` ("red" or "stripes", see LORA_KINDS) on a copy of `pipe`'s UNet and
    write it to `out` in kohya format. `pipe` itself is left unchanged."""
    from peft import LoraConfig

    data, captions = make_dataset(images, seed + 100, force=LORA_KINDS[kind])
    latents = encode_latents(pipe.vae, data)
    work = copy.copy(pipe)
    work.unet = copy.deepcopy(pipe.unet)
    work.unet.requires_grad_(False)
    work.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=list(LORA_TARGETS)))
    params = [p for n, p in work.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    train_unet(work, latents, captions, steps, batch=batch, lr=2e-3, seed=seed, params=params, ema_decay=None,
               log_every=log_every)
    if samples is not None:
        sample_grid(work, CHECK_PROMPTS, Path(samples) / f"lora-{kind}.png")
    lora = _lora_value(work.unet, rank, float(rank))
    return write_kohya(lora, out, provenance={"demo": f"demo-{kind}: trained on tiny-sdxl-shapes by "
                                                      f"loraloom.bases.training ({steps} steps, rank {rank})"})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loraloom.bases.training base OUT_FILE`` / ``loras BASE_FILE OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="python -m loraloom.bases.training", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    base = sub.add_parser("base", help="train the shapes base; write its weights file")
    base.add_argument("out", help="weights file to write (.safetensors)")
    base.add_argument("--images", type=int, default=4096)
    base.add_argument("--vae-steps", type=int, default=800)
    base.add_argument("--unet-steps", type=int, default=1500)
    base.add_argument("--lr", type=float, default=1e-3, help="the UNet's peak learning rate")
    base.add_argument("--resume", help="a weights file to go on training (its VAE is kept)")
    loras = sub.add_parser("loras", help="train the demo LoRAs on a trained base weights file")
    loras.add_argument("base", help="the base's weights file")
    loras.add_argument("out_dir", help="folder for demo-<kind>.safetensors")
    loras.add_argument("--steps", type=int, default=300)
    loras.add_argument("--kind", action="append", choices=list(LORA_KINDS))
    for p in (base, loras):
        p.add_argument("--samples", help="folder for sample grids (PNG)")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.samples:
        Path(args.samples).mkdir(parents=True, exist_ok=True)
    if args.what == "base":
        path = train_base(args.out, images=args.images, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                          seed=args.seed, samples=args.samples, resume=args.resume, lr=args.lr)
        _log(f"wrote {path}")
        return 0
    pipe = load_trained(args.base)
    for kind in args.kind or list(LORA_KINDS):
        out = Path(args.out_dir) / f"demo-{kind}.safetensors"
        train_lora(pipe, kind, out, steps=args.steps, seed=args.seed + 1, samples=args.samples)
        _log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
