"""Tiny LoRA files for the built-in presets, in every format the readers support.

This module sits above `lora` and `bases`: it builds the preset pipelines (`bases.presets`) to learn
their layer shapes and to have diffusers write its own format, and makes LoRA values (`lora`) to fit.

`write_fixtures(out_dir)` writes, for each UNet preset (``tiny-sd15``, ``tiny-sdxl``), one file per
format (keys ``"<preset>/<format>"`` of the returned dict):

- ``diffusers``: written by diffusers' own ``save_lora_weights`` with ``lora_adapter_metadata`` as
  trainers pass it (LoraConfig fields: r, lora_alpha, rank_pattern, alpha_pattern);
- ``diffusers-nometa``: the same tensors, no metadata (alpha = rank for every reader);
- ``peft``: a peft ``save_pretrained``-style folder (``adapter_model.safetensors`` with
  ``base_model.model.`` keys + ``adapter_config.json``), UNet only;
- ``kohya`` / ``kohya-sgm`` / ``kohya-noalpha``: kohya names, diffusers-style or SGM UNet names,
  with and without ``.alpha``;
- ``locon``: kohya LoRA on attention and conv layers (3x3 and 1x1 kernels);
- ``loha`` / ``lokr``: LyCORIS modules, plain and Tucker forms, full and decomposed LoKr factors.

`write_dit_fixtures(out_dir, spec, arch, name)` does the same for a Flux or SD3 base (any
transformer module set, given as a `BaseSpec`): diffusers, kohya, ComfyUI, XLabs, LoHa and LoKr
files (see `DIT_FORMATS`); `write_fixtures` calls it for ``tiny-flux`` and ``tiny-sd3`` with the
preset's own modules. The LoKr file's single-block ``linear1`` modules have Kronecker blocks that
straddle the q / k / v / mlp boundaries, as LyCORIS' own factors do at Flux's real size.

Modules cover attention (to_q/k/v/out, on SDXL also transformer_blocks.1), feed-forward, proj_in/out,
resnet convs, time_emb_proj and both text encoders; ranks 4 and 8; alphas differ from ranks and
between modules. Weights are random at a scale that visibly changes a sampled image. Everything is
seeded: the same call writes byte-identical files. `main(argv)` is the ``loraloom fixtures`` command.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .atomic import TargetExistsError, atomic_write_bytes
from .lora.canonical import LoHaModule, LoKrModule, LoRA, LoRAModule, Module, derived_fingerprint
from .lora.match import BaseSpec, base_spec
from .lora.writers import adapter_config, atomic_save, to_kohya_state_dict, write_kohya

UNET_PRESETS = ("tiny-sd15", "tiny-sdxl")
DIT_PRESETS = ("tiny-flux", "tiny-sd3")
PRESETS = UNET_PRESETS + DIT_PRESETS
FORMATS = ("diffusers", "diffusers-nometa", "peft", "kohya", "kohya-sgm", "kohya-noalpha", "locon", "loha", "lokr")
RANKS = (4, 8)
ALPHAS = (2.0, 3.0, 6.0)  # never equal to a rank: scale != 1 everywhere

# Enough to cover every naming case (SGM blocks 10/11, transformer_blocks.1, two-digit TE layers,
# 1x1 and 3x3 convs) while keeping the SDXL files small enough for fast tests.
_ATTN = re.compile(r"attentions\.[01]\.transformer_blocks\.[01]\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")
_PROJ = re.compile(r"attentions\.[01]\.proj_(in|out)$")
_CONV = re.compile(r"(resnets\.[01]\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$")
_TE = re.compile(r"encoder\.layers\.(0|1|10|11)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def _select(spec: BaseSpec, unet: Sequence[re.Pattern], te: bool) -> list[tuple[str, str]]:
    chosen = [("unet", p) for p in spec.components["unet"] if any(r.search(p) for r in unet)]
    if te:
        for component in ("text_encoder", "text_encoder_2"):
            chosen += [(component, p) for p in spec.components.get(component, {}) if _TE.search(p)]
    return chosen


def _lora_module(gen: torch.Generator, shape: tuple[int, ...], index: int, rank: int | None = None) -> LoRAModule:
    rank = rank or RANKS[index % 2]
    out, flat_in = shape[0], math.prod(shape[1:])
    down = torch.randn(rank, flat_in, generator=gen) / math.sqrt(flat_in)
    up = torch.randn(out, rank, generator=gen) * (0.6 / math.sqrt(rank))
    if len(shape) == 4:
        down, up = down.reshape(rank, *shape[1:]), up.reshape(out, rank, 1, 1)
    return LoRAModule(down=down, up=up, alpha=ALPHAS[index % 3])


def _loha_module(gen: torch.Generator, shape: tuple[int, ...], index: int) -> LoHaModule:
    rank = RANKS[index % 2]
    out, flat_in = shape[0], math.prod(shape[1:])

    def rand(*dims: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*dims, generator=gen) * scale

    small = 0.6 / math.sqrt(flat_in)
    if len(shape) == 4 and shape[2:] != (1, 1):  # Tucker form, as LyCORIS writes 3x3 convs
        return LoHaModule(
            w1a=rand(rank, out, scale=rank**-0.5), w1b=rand(rank, shape[1], scale=rank**-0.5),
            w2a=rand(rank, out, scale=rank**-0.5), w2b=rand(rank, shape[1], scale=small * rank**-0.5),
            t1=rand(rank, rank, *shape[2:], scale=rank**-0.5), t2=rand(rank, rank, *shape[2:], scale=rank**-0.5),
            alpha=ALPHAS[index % 3], shape_hint=shape,
        )  # fmt: skip
    return LoHaModule(
        w1a=rand(out, rank, scale=rank**-0.5), w1b=rand(rank, flat_in),
        w2a=rand(out, rank, scale=rank**-0.5), w2b=rand(rank, flat_in, scale=small),
        alpha=ALPHAS[index % 3], shape_hint=shape if len(shape) == 4 else None,
    )  # fmt: skip


def _lokr_module(gen: torch.Generator, shape: tuple[int, ...], index: int, factor: int = -1) -> LoKrModule:
    from peft.tuners.lokr.layer import factorization

    rank = RANKS[index % 2]
    out_l, out_k = factorization(shape[0], factor)
    in_m, in_n = factorization(shape[1], -1)
    kernel = tuple(shape[2:])
    small = 0.6 / math.sqrt(math.prod(shape[1:]))

    def rand(*dims: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*dims, generator=gen) * scale

    variant = index % 3
    alpha = ALPHAS[index % 3]
    if kernel and kernel != (1, 1):  # conv: w1 full, w2 in Tucker form
        return LoKrModule(
            alpha=alpha, w1=rand(out_l, in_m),
            w2a=rand(rank, out_k, scale=rank**-0.5), w2b=rand(rank, in_n, scale=small * rank**-0.5),
            t2=rand(rank, rank, *kernel, scale=rank**-0.5), shape_hint=shape,
        )  # fmt: skip
    hint = shape if kernel else None
    w2_shape = (out_k, in_n, *kernel)
    if variant == 0:  # w1 full, w2 decomposed (LyCORIS' default)
        return LoKrModule(
            alpha=alpha, w1=rand(out_l, in_m), w2a=rand(out_k, rank, scale=rank**-0.5),
            w2b=rand(rank, in_n * math.prod(kernel), scale=small), shape_hint=hint,
        )  # fmt: skip
    if variant == 1:  # w1 decomposed, w2 full
        return LoKrModule(
            alpha=alpha, w1a=rand(out_l, rank, scale=rank**-0.5), w1b=rand(rank, in_m),
            w2=rand(*w2_shape, scale=small), shape_hint=hint,
        )  # fmt: skip
    return LoKrModule(alpha=alpha, w1=rand(out_l, in_m), w2=rand(*w2_shape, scale=small), shape_hint=hint)


def _make(spec: BaseSpec, chosen: Iterable[tuple[str, str]], seed: int, maker: Callable[..., Module], fmt: str) -> LoRA:
    gen = torch.Generator().manual_seed(seed)
    components: dict[str, dict[str, Module]] = {}
    for index, (component, path) in enumerate(chosen):
        components.setdefault(component, {})[path] = maker(gen, spec.components[component][path].shape, index)
    return LoRA(components, source_format="derived", fingerprint=derived_fingerprint("fixture", [], {"format": fmt, "seed": seed}))


def _peft_config(lora: LoRA, component: str, spec: BaseSpec) -> dict[str, Any]:
    """LoraConfig fields as a trainer writes them, with the live models' module names."""
    from peft import LoraConfig

    fields = adapter_config(lora, component)
    config = LoraConfig(
        r=fields["r"],
        lora_alpha=fields["lora_alpha"],
        target_modules=[spec.model_name(component, p) for p in fields["target_modules"]],
        rank_pattern={spec.model_name(component, p): v for p, v in fields["rank_pattern"].items()},
        alpha_pattern={spec.model_name(component, p): v for p, v in fields["alpha_pattern"].items()},
    ).to_dict()
    # sets and enums in to_dict(): make them JSON-stable so the file bytes do not depend on hash seeds
    return json.loads(json.dumps(config, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def _peft_layers(lora: LoRA, component: str, spec: BaseSpec) -> dict[str, torch.Tensor]:
    out = {}
    for path, module in lora.components[component].items():
        name = spec.model_name(component, path)
        out[f"{name}.lora_A.weight"] = module.down
        out[f"{name}.lora_B.weight"] = module.up
    return out


def _write_diffusers_own(pipe: Any, lora: LoRA, spec: BaseSpec, out_dir: Path, name: str, with_metadata: bool) -> Path:
    kwargs: dict[str, Any] = {}
    arg_names = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
    for component in lora.components:
        kwargs[f"{arg_names[component]}_lora_layers"] = _peft_layers(lora, component, spec)
        if with_metadata:
            kwargs[f"{arg_names[component]}_lora_adapter_metadata"] = _peft_config(lora, component, spec)
    from safetensors import safe_open

    # diffusers writes in place, non-atomically: let it write into a scratch folder, then re-serialise
    # the same tensors and metadata in sorted order (safetensors' own header order varies between
    # processes, and fixtures must be byte-identical from run to run) through the atomic writer.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}.") as scratch:
        type(pipe).save_lora_weights(save_directory=scratch, weight_name=name, safe_serialization=True, **kwargs)
        with safe_open(str(Path(scratch) / name), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
    return atomic_save(tensors, out_dir / name, metadata)


def _write_peft_folder(lora: LoRA, spec: BaseSpec, folder: Path) -> Path:
    tensors = {f"base_model.model.{k}": v for k, v in _peft_layers(lora, "unet", spec).items()}
    atomic_save(tensors, folder / "adapter_model.safetensors", {"format": "pt"})
    config = _peft_config(lora, "unet", spec)
    atomic_write_bytes(folder / "adapter_config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


def _out_dir(out_dir: str | Path) -> Path:
    """The folder to write into, created if missing; a file of that name is refused, not replaced."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TargetExistsError("is a file, not a folder to write LoRAs into.", file=out_dir, value="a file",
                                limit="a folder", fix="name a folder (it is created if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_fixtures(out_dir: str | Path, presets: Sequence[str] = PRESETS, seed: int = 0) -> dict[str, Path]:
    """Write the fixture LoRAs for `presets` into `out_dir`; return ``{"<preset>/<format>": path}``
    (the ``peft`` entry is a folder). Deterministic for a given `seed`."""
    from .bases.presets import build_pipeline

    out_dir = _out_dir(out_dir)
    written: dict[str, Path] = {}
    for p_index, preset in enumerate(presets):
        pipe = build_pipeline(preset, dtype="fp32", device="cpu")
        spec = base_spec(pipe)
        if spec.arch in DIT_FORMATS:  # Flux / SD3.5: the transformer layouts, on the preset's own modules
            written.update(write_dit_fixtures(out_dir, spec, spec.arch, preset, seed))
            continue
        base_seed = seed * 1000 + p_index * 100
        attn = _select(spec, [_ATTN, _PROJ], te=True)
        attn_conv = _select(spec, [_ATTN, _CONV, _PROJ], te=False)
        some_conv = attn + [("unet", p) for p in spec.components["unet"] if p.endswith(("resnets.0.conv1", "resnets.0.conv_shortcut"))]

        def target(fmt: str) -> Path:
            return out_dir / f"{preset}-{fmt}.safetensors"

        diffusers_lora = _make(spec, some_conv, base_seed + 1, _lora_module, "diffusers")
        written[f"{preset}/diffusers"] = _write_diffusers_own(pipe, diffusers_lora, spec, out_dir, target("diffusers").name, True)
        written[f"{preset}/diffusers-nometa"] = _write_diffusers_own(
            pipe, diffusers_lora, spec, out_dir, target("diffusers-nometa").name, False
        )
        unet_only = _make(spec, [c for c in attn if c[0] == "unet"], base_seed + 2, _lora_module, "peft")
        written[f"{preset}/peft"] = _write_peft_folder(unet_only, spec, out_dir / f"{preset}-peft")
        kohya = _make(spec, attn, base_seed + 3, _lora_module, "kohya")
        written[f"{preset}/kohya"] = write_kohya(kohya, target("kohya"), unet_names="diffusers")
        written[f"{preset}/kohya-sgm"] = write_kohya(kohya, target("kohya-sgm"), unet_names="sgm")
        noalpha = {k: v for k, v in _kohya_dict(kohya).items() if not k.endswith(".alpha")}
        written[f"{preset}/kohya-noalpha"] = atomic_save(noalpha, target("kohya-noalpha"), {"format": "pt"})
        written[f"{preset}/locon"] = write_kohya(_make(spec, attn_conv, base_seed + 4, _lora_module, "locon"), target("locon"))
        written[f"{preset}/loha"] = write_kohya(_make(spec, attn_conv + [c for c in attn if c[0] != "unet"], base_seed + 5, _loha_module, "loha"), target("loha"))
        written[f"{preset}/lokr"] = write_kohya(_make(spec, attn_conv + [c for c in attn if c[0] != "unet"], base_seed + 6, _lokr_module, "lokr"), target("lokr"))
    return written


DIT_FORMATS = {
    "flux": ("diffusers", "kohya", "comfyui", "xlabs", "loha", "lokr"),
    "sd3": ("diffusers", "kohya", "comfyui"),
}
"""Fixture formats per DiT architecture (`write_dit_fixtures`)."""
# Blocks the DiT fixtures cover: first, second, a two-digit one and the last of each block list.
_DIT_BLOCKS = {"flux": {"double_blocks": (0, 1, 10, 18), "single_blocks": (0, 1, 10, 37)},
               "sd3": {"joint_blocks": (0, 1, 10, 37)}}  # fmt: skip
_T5 = re.compile(r"encoder\.block\.(0|1)\.layer\.\d\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wi|wo))$")


def _dit_originals(spec: BaseSpec, arch: str,
                   every_block: bool = False) -> list[tuple[str, tuple[Any, ...], tuple[int, ...]]]:
    """(original module name, targets, fused weight shape) of the covered original modules the
    base has (the fused shape: the targets' rows stacked); `every_block`: in every block, not only
    the `_DIT_BLOCKS` sample."""
    from .lora.dit_keys import DIFFUSERS_BLOCKS, original_name_table, targets_for

    have = spec.components["transformer"]
    blocks = _DIT_BLOCKS[arch]
    if every_block:
        blocks = {b: range(1 + max(int(p.split(".")[1]) for p in have if p.startswith(f"{DIFFUSERS_BLOCKS[b]}.")))
                  for b in blocks}
    chosen = []
    for name, targets in original_name_table(arch, {b: max(i) + 1 for b, i in blocks.items()}):
        head = name.split(".")
        if head[0] in blocks and int(head[1]) not in blocks[head[0]]:
            continue
        if name.endswith("linear1_qkv") or any(t.path not in have for t in targets):
            continue
        shapes = [have[t.path].shape for t in targets]
        shape = (sum(sh[0] for sh in shapes), *shapes[0][1:]) if len(targets) > 1 else tuple(shapes[0])
        chosen.append((name, targets_for(name, targets, shape), tuple(shape)))
    return chosen


def _fused_lora(spec: BaseSpec, arch: str, seed: int, maker: Callable[..., Module], fmt: str, te: bool = True,
                every_block: bool = False) -> LoRA:
    """A LoRA made on the original (fused) modules and split onto diffusers' paths, as a file in an
    original layout reads: every part of a fused weight shares its down (LyCORIS: its shared factors)."""
    from .lora.dit_keys import split_module

    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, dict[str, Module]] = {}
    for index, (name, targets, shape) in enumerate(_dit_originals(spec, arch, every_block)):
        if maker is _lokr_module and name.endswith("linear1"):
            fused = _lokr_module(gen, shape, index, _straddling_factor(shape))
        else:
            fused = maker(gen, shape, index)
        modules.setdefault("transformer", {}).update((t.path, split_module(fused, t.segments, name)) for t in targets)
    if te:
        gen_te = torch.Generator().manual_seed(seed + 50)
        for index, (component, path) in enumerate(_dit_te(spec)):
            modules.setdefault(component, {})[path] = maker(gen_te, spec.components[component][path].shape, index)
    return LoRA(modules, source_format="derived", fingerprint=derived_fingerprint("fixture", [], {"format": fmt, "seed": seed}))


def _straddling_factor(shape: tuple[int, ...]) -> int:
    """A LoKr factor for Flux's ``linear1`` (rows q, k, v, mlp, each part a multiple of the width)
    whose Kronecker blocks straddle the part boundaries, as LyCORIS' own choice does at the real
    size (21504 rows as w1 128 x w2 168, and 3072 is no multiple of 168): LyCORIS' default (-1)
    where it straddles, else 8 (tiny-flux's 224 rows: 14 x 16 tiles its 32-row parts, 8 x 28 not)."""
    from peft.tuners.lokr.layer import factorization

    return -1 if shape[1] % factorization(shape[0], -1)[1] else 8


def _dit_te(spec: BaseSpec) -> list[tuple[str, str]]:
    chosen = []
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        chosen += [(component, p) for p in spec.components.get(component, {}) if _TE.search(p) or _T5.search(p)]
    return chosen


def _xlabs_tensors(spec: BaseSpec, seed: int, rank: int | None = None, every_block: bool = False) -> dict[str, torch.Tensor]:
    """An XLabs Flux LoRA (x-flux's processor names, no alpha: x-flux applies up @ down as is)."""
    procs = {"img_attn.qkv": "qkv_lora1", "txt_attn.qkv": "qkv_lora2", "img_attn.proj": "proj_lora1",
             "txt_attn.proj": "proj_lora2", "linear2": "proj_lora"}  # fmt: skip
    have = spec.components["transformer"]
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for index, (name, targets, shape) in enumerate(_dit_originals(spec, "flux", every_block)):
        if not name.startswith(("double_blocks.", "single_blocks.")):
            continue  # x-flux has LoRA processors in the blocks only
        blocks, number, inner = name.split(".", 2)
        if inner == "linear1":  # x-flux's qkv_lora covers linear1's q / k / v rows only
            inner, shape = "linear1_qkv", (3 * have[targets[0].path].shape[0], shape[1])
        proc = procs.get(inner, "qkv_lora" if inner == "linear1_qkv" else None)
        if proc is None:
            continue
        module = _lora_module(gen, shape, index, rank)
        out[f"{blocks}.{number}.processor.{proc}.down.weight"] = module.down
        out[f"{blocks}.{number}.processor.{proc}.up.weight"] = module.up
    return out


def write_dit_fixtures(out_dir: str | Path, spec: BaseSpec, arch: str, name: str, seed: int = 0,
                       rank: int | None = None, every_block: bool = False) -> dict[str, Path]:
    """Write the fixture LoRAs of a Flux (`arch` "flux") or SD3 ("sd3") base, given as a `BaseSpec`
    with a "transformer" component (and text encoders), one file per format of `DIT_FORMATS`, as
    ``<name>-<format>.safetensors``; return ``{"<name>/<format>": path}``. Deterministic.

    - ``diffusers``: separate LoRAs (own downs, ranks 4 / 8, per-module alphas) on diffusers'
      modules, with ``lora_adapter_metadata``;
    - ``kohya`` / ``comfyui``: LoRAs on the original fused modules (qkv, Flux's ``linear1``, the
      final modulation) with kohya names or ComfyUI's dotted ``diffusion_model.`` names, text
      encoders included;
    - ``xlabs`` (Flux): XLabs' processor LoRAs on the double blocks' qkv / proj and the single
      blocks' qkv / linear2;
    - ``loha`` / ``lokr`` (Flux): LyCORIS modules on the original modules, kohya names.

    `rank`: every LoRA module of that rank instead (LyCORIS modules keep theirs); `every_block`:
    modules in every block of the base, not only in blocks 0, 1, 10 and the last. The benchmarks
    write real-size files with them.
    """
    from .lora.writers import to_original_state_dict, write_diffusers

    out_dir = _out_dir(out_dir)
    written: dict[str, Path] = {}

    def target(fmt: str) -> Path:
        return out_dir / f"{name}-{fmt}.safetensors"

    def lora_module(gen: torch.Generator, shape: tuple[int, ...], index: int) -> LoRAModule:
        return _lora_module(gen, shape, index, rank)

    for index, fmt in enumerate(DIT_FORMATS[arch]):
        fmt_seed = seed * 1000 + 500 + index
        if fmt == "diffusers":
            chosen = [("transformer", t.path) for _, targets, _ in _dit_originals(spec, arch, every_block) for t in targets]
            chosen += _dit_te(spec)
            written[f"{name}/{fmt}"] = write_diffusers(_make(spec, chosen, fmt_seed, lora_module, fmt), target(fmt))
        elif fmt in ("kohya", "comfyui"):
            lora = _fused_lora(spec, arch, fmt_seed, lora_module, fmt, every_block=every_block)
            if fmt == "kohya":
                written[f"{name}/{fmt}"] = write_kohya(lora, target(fmt), arch=arch)
            else:
                tensors, _ = to_original_state_dict(lora, arch=arch, naming="comfyui")
                written[f"{name}/{fmt}"] = atomic_save(tensors, target(fmt), {"format": "pt"})
        elif fmt == "xlabs":
            written[f"{name}/{fmt}"] = atomic_save(_xlabs_tensors(spec, fmt_seed, rank, every_block), target(fmt), {"format": "pt"})
        else:
            maker = _loha_module if fmt == "loha" else _lokr_module
            lora = _fused_lora(spec, arch, fmt_seed, maker, fmt, te=False, every_block=every_block)
            written[f"{name}/{fmt}"] = write_kohya(lora, target(fmt), arch=arch)
    return written


DEMO_LORAS = ("demo-a", "demo-b")
DEMO_RANK = 8


def write_demo_loras(out_dir: str | Path, preset: str = "tiny-sdxl") -> dict[str, Path]:
    """The demo LoRAs the shipped workflows use: kohya files for `preset`, rank 8 on every module
    (so every merge method applies, dare_linear included), attention, feed-forward and both text
    encoders. Deterministic."""
    from .bases.presets import build_pipeline

    out_dir = _out_dir(out_dir)
    spec = base_spec(build_pipeline(preset, dtype="fp32", device="cpu"))
    chosen = _select(spec, [_ATTN, _PROJ], te=True)
    written = {}
    for i, name in enumerate(DEMO_LORAS):
        lora = _make(spec, chosen, 7000 + i, lambda gen, shape, index: _lora_module(gen, shape, index, DEMO_RANK),
                     name)
        # "lora.fixtures" was this module's name when the shipped files were written; keeping the text
        # keeps `loraloom fixtures --demo` byte-identical to workflows/loras.
        written[name] = write_kohya(lora, out_dir / f"{name}.safetensors",
                                    provenance={"demo": f"{name} for {preset}, written by lora.fixtures"})
    return written


FLUX_DEMO_LORAS = {"demo-flux-kohya": "kohya", "demo-flux-diffusers": "diffusers"}
"""The flux_blend / flux_merge demo LoRAs for ``tiny-flux`` and the layout each ships in."""


def write_flux_demo_loras(out_dir: str | Path) -> dict[str, Path]:
    """The demo LoRAs of the shipped Flux workflows, for ``tiny-flux``, in two layouts users meet:
    ``demo-flux-kohya`` (kohya's Flux names on the original fused modules: each double block's qkv,
    each single block's linear1, split onto diffusers' q / k / v / proj_mlp when read; CLIP and T5
    included) and ``demo-flux-diffusers`` (``transformer.…`` keys on diffusers' separate modules with
    ``lora_adapter_metadata``, as AI-Toolkit writes them). Rank 8 on every module of all 19 double
    and 38 single blocks (block weights have something to act on; every merge method applies).
    Deterministic."""
    from .bases.presets import build_pipeline
    from .lora.writers import write_diffusers

    out_dir = _out_dir(out_dir)
    spec = base_spec(build_pipeline("tiny-flux", dtype="fp32", device="cpu"))

    def rank8(gen: torch.Generator, shape: tuple[int, ...], index: int) -> LoRAModule:
        return _lora_module(gen, shape, index, DEMO_RANK)

    written = {}
    for i, (name, fmt) in enumerate(FLUX_DEMO_LORAS.items()):
        provenance = {"demo": f"{name} for tiny-flux, written by loraloom fixtures --demo"}
        path = out_dir / f"{name}.safetensors"
        if fmt == "kohya":
            lora = _fused_lora(spec, "flux", 7100 + i, rank8, name, every_block=True)
            written[name] = write_kohya(lora, path, arch="flux", provenance=provenance)
        else:
            chosen = [("transformer", t.path) for _, targets, _ in _dit_originals(spec, "flux", every_block=True)
                      for t in targets] + _dit_te(spec)
            written[name] = write_diffusers(_make(spec, chosen, 7100 + i, rank8, name), path, provenance=provenance)
    return written


COMFY_CHECKPOINT_SEED = 1600


def comfy_checkpoint_pipeline(arch: str = "sd15", seed: int = COMFY_CHECKPOINT_SEED):
    """The diffusers pipeline `write_comfy_checkpoint` writes: SD1.5 as small as ComfyUI's
    CheckpointLoaderSimple allows, random from `seed`, float16.

    ComfyUI detects SD1.5 from the UNet's weights (model_channels 320, cross-attention width 768:
    `comfy.supported_models.SD15`) and builds the rest of the UNet from what the file holds, so the
    UNet here has two levels of 320 channels and one layer per block, laid out as SD1.5's first and
    last levels (cross-attention down, plain down; plain up, cross-attention up), so every module
    lies in SD1.5's block of the same name and block weights mean on it what they mean on SD1.5.
    Its CLIP-L text encoder and VAE
    have fixed sizes (ComfyUI's own configs), and ComfyUI does not initialise layers a file leaves
    out, so both are full size. Float16 halves the file (about 0.4 GB); both ComfyUI and LoadBase
    load it as float32 on a CPU, from the same values."""
    from .bases.arch import BaseModelError
    from .bases.presets import build_tokenizer, preset_configs

    if arch != "sd15":
        raise BaseModelError(f"write_comfy_checkpoint writes arch 'sd15' only, not {arch!r}", value=arch, limit="sd15",
                             kind="unsupported_arch")
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = preset_configs("tiny-sd15")
    unet = {**configs["unet"], "block_out_channels": [320, 320], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "norm_num_groups": 32,
            "cross_attention_dim": 768, "attention_head_dim": 8}
    vae = {**configs["vae"], "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "sample_size": 512}
    # CLIP ViT-L/14's shape; our tokenizer's ids fit in its vocabulary (ComfyUI tokenizes with its own)
    text = {**configs["text_encoder"], "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
            "num_attention_heads": 12, "projection_dim": 768}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**vae), text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=build_tokenizer(),
            unet=UNet2DConditionModel(**unet), scheduler=EulerDiscreteScheduler(**configs["scheduler"]),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(torch.float16)


def write_comfy_checkpoint(path: str | Path, arch: str = "sd15", config: str | Path | None = None,
                           seed: int = COMFY_CHECKPOINT_SEED) -> tuple[Path, Path]:
    """Write a single-file SD1.5 checkpoint in the original (LDM) layout that ComfyUI's core
    CheckpointLoaderSimple detects and loads (see `comfy_checkpoint_pipeline`), and the config folder
    our LoadBase loads the same file with (default: ``<name>-config`` beside it). Deterministic for
    `seed`. Returns (checkpoint, config folder)."""
    from .bases.export import save_single_file_with_config

    path = Path(path)
    config = Path(config) if config is not None else path.with_name(path.stem + "-config")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_single_file_with_config(comfy_checkpoint_pipeline(arch, seed), path, config)


def write_comfy_loras(out_dir: str | Path, checkpoint_pipe=None, seed: int = 0) -> dict[str, Path]:
    """LoRAs for the `write_comfy_checkpoint` model, as kohya files: ``comfy-a`` and ``comfy-b`` (rank 4
    and 8 modules on every attention, feed-forward and proj layer of the UNet and on four CLIP-L
    layers) and ``comfy-locon`` (the same plus the resnet convs). Deterministic."""
    out_dir = _out_dir(out_dir)
    spec = base_spec(checkpoint_pipe if checkpoint_pipe is not None else comfy_checkpoint_pipeline())
    attn = _select(spec, [_ATTN, _PROJ], te=True)
    conv = attn + _select(spec, [_CONV], te=False)
    return {name: write_kohya(_make(spec, chosen, seed * 100 + 8000 + i, _lora_module, name),
                              out_dir / f"{name}.safetensors", arch="sd15", unet_names="diffusers")
            for i, (name, chosen) in enumerate((("comfy-a", attn), ("comfy-b", attn), ("comfy-locon", conv)))}


DIT_PARTS_SEED = 1700
# The real vocabularies' sizes (CLIP's 49408, T5 v1.1's 32128), so that the real tokenizers (ComfyUI's
# own, say) can drive these encoders as well as the tiny built-in ones, whose ids are fewer.
CLIP_VOCAB, T5_VOCAB = 49408, 32128
_PARTS_T5_WIDTH = 128  # SD3.5 pads CLIP-L's and CLIP-G's hidden states (64 + 64 here) to T5's width


def dit_parts_pipeline(arch: str, seed: int = DIT_PARTS_SEED):
    """A small Flux or SD3.5 pipeline whose every config follows from its weights' shapes and the
    published models' family values (heads of 128 for Flux, 64 for SD3.5 and CLIP; GroupNorms of 32;
    CLIP-L quick_gelu, CLIP-G gelu; T5 v1.1), so that config "auto" can derive it from the files
    `write_dit_parts` writes, as it does for the real models. One or two blocks each, random from
    ``seed``, float32, in eval mode (T5's dropout off, as a loaded model's). (The tiny presets cannot be
    derived: their widths are below those values.)"""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .bases.auto_config import CLIP_TOKEN_IDS
    from .bases.dit_config import T5_FAMILY, VAE_FAMILY
    from .bases.presets import SCHEDULER_FLUX, SCHEDULER_SD3, build_t5_tokenizer, build_tokenizer

    def clip(act: str, with_projection: bool):
        config = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=77,
                                hidden_act=act, projection_dim=64, **CLIP_TOKEN_IDS)
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)

    family = VAE_FAMILY[arch]
    t5 = T5Config(vocab_size=T5_VOCAB, d_model=_PARTS_T5_WIDTH, d_kv=32, d_ff=256, num_layers=1,
                  num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=32, **T5_FAMILY)
    from .lora.arches import ARCHES

    length = ARCHES[arch].sampling.max_sequence_length
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[32] * 4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            layers_per_block=1, norm_num_groups=32, sample_size=family["vae_sample_size"],
                            scaling_factor=family["scaling_factor"], shift_factor=family["shift_factor"],
                            force_upcast=family["force_upcast"], use_quant_conv=False, use_post_quant_conv=False)
        if arch == "flux":
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                num_attention_heads=1, joint_attention_dim=_PARTS_T5_WIDTH, pooled_projection_dim=64,
                guidance_embeds=True, axes_dims_rope=[16, 56, 56])
            return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_FLUX), vae=vae,
                                text_encoder=clip("quick_gelu", False), tokenizer=build_tokenizer(),
                                text_encoder_2=T5EncoderModel(t5).eval(), tokenizer_2=build_t5_tokenizer(length),
                                transformer=transformer)
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=_PARTS_T5_WIDTH, caption_projection_dim=128,
            pooled_projection_dim=128, pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=())
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_SD3), vae=vae,
            text_encoder=clip("quick_gelu", True), tokenizer=build_tokenizer(),
            text_encoder_2=clip("gelu", True), tokenizer_2=build_tokenizer(pad_token="!"),
            text_encoder_3=T5EncoderModel(t5).eval(), tokenizer_3=build_t5_tokenizer(length))


def write_dit_parts(models_dir: str | Path, arch: str, pipe=None, name: str | None = None,
                    all_in_one: bool = False, tokenizers: bool = True) -> dict[str, Path]:
    """Write ``pipe`` (default: `dit_parts_pipeline(arch)`) as the files a ComfyUI user keeps for a
    Flux / SD3.5 model, under ``models_dir`` in ComfyUI's layout: the transformer in its original
    layout (``checkpoints/<name>.safetensors``, default name ``<arch>-parts``; no metadata of ours, as
    a file from elsewhere), ``text_encoders/clip_l.safetensors`` (and ``clip_g`` for SD3.5; HF names
    under ``text_model.``), ``text_encoders/t5xxl_fp32.safetensors``, ``vae/ae.safetensors`` (LDM
    names), and (``tokenizers``) the pipeline's tokenizers under ``tokenizers/clip`` and
    ``tokenizers/t5``. ``all_in_one``: the text encoders and VAE go into the checkpoint instead, under
    ComfyUI's all-in-one prefixes. Returns {part: path}."""
    from .bases import dit_file, ldm_keys
    from .bases.arch import UNET_PREFIX, VAE_PREFIX
    from .bases.dit_parts import PARTS
    from .lora.writers import atomic_save

    pipe = pipe if pipe is not None else dit_parts_pipeline(arch)
    models_dir = Path(models_dir)
    transformer = dit_file.to_original(pipe.transformer.state_dict(), arch)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for part in PARTS[arch]:
        state = getattr(pipe, part.component).state_dict()
        if part.name == "vae":
            parts[part.name] = {k.removeprefix(VAE_PREFIX): v  # bare, as BFL's ae.safetensors
                                for k, v in ldm_keys.vae_to_original(state, pipe.vae.config).items()}
        elif part.name.startswith("clip"):
            parts[part.name] = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                                for k, v in state.items()}
        else:  # T5: the tied input embedding is saved once, as "shared.weight"
            parts[part.name] = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    written = {}
    checkpoint = models_dir / "checkpoints" / f"{name or arch + '-parts'}.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if all_in_one:
        tensors = {UNET_PREFIX + k: v for k, v in transformer.items()}
        for part in PARTS[arch]:
            tensors.update({part.prefix + k: v for k, v in parts[part.name].items()})
        written["checkpoint"] = atomic_save(tensors, checkpoint, {"format": "pt"})
    else:
        written["checkpoint"] = atomic_save(transformer, checkpoint, {"format": "pt"})
        for part in PARTS[arch]:
            folder = models_dir / part.folder
            folder.mkdir(parents=True, exist_ok=True)
            file_name = "t5xxl_fp32.safetensors" if part.name == "t5xxl" else part.file_names[0]
            written[part.name] = atomic_save(parts[part.name], folder / file_name, {"format": "pt"})
    for kind, tokenizer in (("clip", pipe.tokenizer), ("t5", getattr(pipe, "tokenizer_3", None) or pipe.tokenizer_2)):
        folder = models_dir / "tokenizers" / kind
        if not tokenizers:
            break
        if not folder.is_dir():
            tokenizer.save_pretrained(folder)
        written[f"tokenizer_{kind}"] = folder
    return written


def _kohya_dict(lora: LoRA) -> dict[str, torch.Tensor]:
    return to_kohya_state_dict(lora, unet_names="diffusers")


def main(argv: Sequence[str] | None = None) -> int:
    """``loraloom fixtures OUT_DIR [--preset P ...] [--seed N]``: write the fixture LoRAs, print their paths."""
    parser = argparse.ArgumentParser(prog="loraloom fixtures", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write into (created if missing)")
    parser.add_argument("--preset", action="append", choices=PRESETS, help="preset(s) to cover (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--demo", action="store_true",
                        help="write the demo LoRAs of the shipped workflows instead (the random ones: demo-a, demo-b, "
                        "demo-flux-kohya, demo-flux-diffusers)")
    args = parser.parse_args(argv)
    if args.demo:
        written = {**write_demo_loras(args.out_dir), **write_flux_demo_loras(args.out_dir)}
    else:
        written = write_fixtures(args.out_dir, presets=tuple(args.preset or PRESETS), seed=args.seed)
    for name, path in written.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
