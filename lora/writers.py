"""Write a canonical `LoRA` as a kohya file (A1111, ComfyUI) or a diffusers file
(``pipe.load_lora_weights``), atomically, with provenance in ``loraloom.*`` metadata.

- kohya: ``lora_unet_...`` (diffusers-style module names for SD1.x, SGM/LDM block names for SDXL,
  as kohya-ss itself writes them; `unet_names` overrides), ``lora_te_`` (SD1.x) or ``lora_te1_`` /
  ``lora_te2_`` (SDXL) with ``text_model_``, ``.lora_down.weight`` / ``.lora_up.weight`` and a
  float32 ``.alpha`` per module. LoHa and LoKr modules keep their ``hada_`` / ``lokr_`` keys.
- diffusers: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder(_2).text_model.``
  paths (diffusers strips ``text_model.`` for models without it), and diffusers'
  ``lora_adapter_metadata`` (r, lora_alpha, rank_pattern, alpha_pattern, target_modules per
  component) so every module's alpha and rank survive. LoHa/LoKr cannot be expressed there: convert
  them with `convert.as_lora` first.

Flux and SD3 LoRAs (a "transformer" component) are written in diffusers' layout (``transformer.``
keys) or in the original layout (`to_original_state_dict`: kohya names, which kohya-ss writes and
ComfyUI's loader reads, or ComfyUI's dotted ``diffusion_model.`` names), where the parts of a fused
original weight (q/k/v, Flux's single-block ``linear1``) are fused again: exactly, except where parts
with different scales (alpha / rank) share one alpha, see `dit_keys.fuse_modules`.

Round trips are exact: writing and reading back gives the same tensors (same dtype, same bytes),
the same alphas and the same module paths.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch

from ..atomic import atomic_file
from .canonical import TEXT_ENCODERS, LoRA, LoRAModule, Module
from .errors import LoRAFormatError
from .keymap import LAYOUTS, UNetLayout, kohya_module_name, te_model_path
from .match import guess_architecture
from .readers import ADAPTER_METADATA_KEY, FUSED_PARTS_KEY

PROVENANCE_PREFIX = "loraloom."
_OWNED_KEYS = ("format", ADAPTER_METADATA_KEY)  # rewritten by every writer


def atomic_save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Save a safetensors file atomically and deterministically.

    The file is written to a temp file in the same folder, fsynced, then os.replace'd over `path`:
    a crash leaves the old file or the new one, never half of one. Unlike safetensors' own writer
    (whose metadata order follows a randomly seeded hash map), the header lists metadata and tensors
    in sorted order, so the same input always gives the same bytes; tensors are streamed one at a
    time instead of being assembled into one buffer first.
    """
    path = Path(path)
    with atomic_file(path) as f:
        write_safetensors(f, tensors, metadata)
    return path


def write_safetensors(f, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file into the open binary file ``f``: the same bytes as `atomic_save`
    (sorted header, tensors streamed one at a time), with no temp file or fsync of its own."""
    header, ordered = _header(tensors, metadata)
    f.write(len(header).to_bytes(8, "little"))
    f.write(header)
    for t in ordered:
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[torch.Tensor]]:
    from .safefile import SUPPORTED_DTYPES

    codes = {dtype: code for code, dtype in SUPPORTED_DTYPES.items()}
    entries: dict[str, Any] = {}
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise LoRAFormatError(f"metadata values must be strings, got {bad}", key=next(iter(bad)), value=bad)
        entries["__metadata__"] = dict(sorted(metadata.items()))
    for name, t in tensors.items():
        if t.dtype not in codes:
            raise LoRAFormatError(
                f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors", key=name, value=str(t.dtype)
            )
    # The data in safetensors' own order, widest elements first (then by dtype and name): every
    # tensor starts aligned to its element size, and each dtype's tensors are one contiguous run,
    # which the reader reads and checks a slice at a time instead of tensor by tensor.
    ordered, offset, placed = [], 0, {}
    for name in sorted(tensors, key=lambda name: (-tensors[name].element_size(), codes[tensors[name].dtype], name)):
        t = tensors[name].detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        placed[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        ordered.append(t)
        offset += size
    entries.update(sorted(placed.items()))
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return header, ordered


def _metadata(lora: LoRA, fmt: str, provenance: Mapping[str, Any] | None) -> dict[str, str]:
    meta = {
        k: v for k, v in lora.metadata.items() if k not in _OWNED_KEYS and not k.startswith(PROVENANCE_PREFIX)
    }
    meta["format"] = "pt"
    entries: dict[str, Any] = {
        "format": fmt,
        "source_format": lora.source_format,
        "fingerprint": lora.fingerprint,
        **dict(provenance or {}),
    }
    for key, value in entries.items():
        meta[PROVENANCE_PREFIX + key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta


def _arch(lora: LoRA, arch: str | None) -> str:
    if arch is not None:
        if arch not in LAYOUTS:
            raise LoRAFormatError(f"arch {arch!r} is not one of {', '.join(LAYOUTS)}", value=arch, limit=tuple(LAYOUTS))
        return arch
    guessed, _ = guess_architecture(lora)
    return guessed or "sd15"


def to_kohya_state_dict(
    lora: LoRA, *, arch: str | None = None, unet_names: str = "auto", layout: UNetLayout | None = None
) -> dict[str, torch.Tensor]:
    """The kohya state dict of `lora` (tensors shared, not copied; for a Flux / SD3 LoRA see
    `to_original_state_dict`, which also returns the fused-part record `write_kohya` stores).

    `arch` ("sd15" | "sdxl", guessed from the module paths by default) picks the text-encoder prefix
    (``lora_te_`` vs ``lora_te1_``) and, with ``unet_names="auto"``, the UNet naming: diffusers-style
    for SD1.5, SGM for SDXL. `unet_names` "diffusers" or "sgm" forces one; `layout` overrides the
    SGM block layout (default: the architecture's).
    """
    if unet_names not in ("auto", "diffusers", "sgm"):
        raise LoRAFormatError(
            f"unet_names {unet_names!r} is not one of auto, diffusers, sgm", value=unet_names, limit=("auto", "diffusers", "sgm")
        )
    if "transformer" in lora.components:
        return to_original_state_dict(lora, arch=arch)[0]
    arch = _arch(lora, arch)
    use_sgm = unet_names == "sgm" or (unet_names == "auto" and arch == "sdxl")
    sgm_layout = (layout or LAYOUTS[arch]) if use_sgm else None
    te_prefix = "lora_te1_" if arch == "sdxl" else "lora_te_"
    out: dict[str, torch.Tensor] = {}
    for component, path, module in lora.modules():
        put_module(out, kohya_module_name(component, path, te_prefix=te_prefix, sgm_layout=sgm_layout), module)
    return out


def put_module(out: dict[str, torch.Tensor], name: str, module: Module, naming: str = "kohya") -> None:
    """Put `module`'s tensors into state dict `out` under module name `name`, as kohya files hold
    them (``.lora_down.weight`` / ``.lora_up.weight``, or ``lora_A`` / ``lora_B`` with `naming`
    "comfyui"; LyCORIS' ``hada_`` / ``lokr_`` keys) with a float32 ``.alpha``: what ComfyUI's LoRA
    loader reads. The tensors are shared, not copied."""
    if getattr(module, "rows", None) is not None:
        # its factors are a whole fused module's: written as they are, they would change every row
        raise LoRAFormatError(
            f"module {name!r} ({module.key}) is rows {list(module.rows)} of a LoKr's Kronecker product (a "
            "part of a LoKr on a fused weight): no LoKr file module holds only some rows of a product",
            key=module.key,
            value=list(module.rows),
            fix="write it with all its sibling parts in the original layout, or convert it with loraloom.lora.convert.as_lora first.",
        )
    if isinstance(module, LoRAModule):
        down, up = ("lora_down", "lora_up") if naming == "kohya" else ("lora_A", "lora_B")
        out[f"{name}.{down}.weight"] = module.down
        out[f"{name}.{up}.weight"] = module.up
    else:
        for suffix, tensor in module.tensors().items():
            out[f"{name}.{suffix}"] = tensor
    out[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)


def _dit_arch(lora: LoRA, arch: str | None) -> str:
    if arch is None:
        arch, _ = guess_architecture(lora)
    if arch not in ("flux", "sd3"):
        raise LoRAFormatError(
            f"a transformer LoRA is written for arch 'flux' or 'sd3', not {arch!r}"
            + ("" if arch else " (its module paths do not tell which)"),
            value=arch,
            limit=("flux", "sd3"),
            fix="pass arch='flux' or arch='sd3'.",
        )
    return arch


_COMFY_TE = {"flux": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
             "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}}  # fmt: skip


def to_original_state_dict(
    lora: LoRA, *, arch: str | None = None, naming: str = "kohya"
) -> tuple[dict[str, torch.Tensor], dict[str, list[list[float]]]]:
    """(state dict, fused-part record) of a Flux / SD3 LoRA in the original layout: the
    transformer's modules under their original names, the parts of a fused original weight fused
    again (`dit_keys.fuse_modules`).

    `naming` "kohya" (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``.alpha``; CLIP
    encoders ``lora_te1_`` / ``lora_te2_`` (SD3's CLIP-G), T5 ``lora_te2_`` (Flux) or ``lora_te3_``
    (SD3)) is what kohya-ss writes and ComfyUI's loader reads; "comfyui" writes ComfyUI's dotted
    names (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``,
    ``text_encoders.clip_l.transformer.``). `arch` ("flux" | "sd3") is guessed from the paths by
    default. The record names, per fused module written with stacked downs, each part's (rank,
    alpha), so reading splits it back into the same parts (`dit_keys.split_stacked`), also where the
    parts' scales differ and the file's one alpha gives each part's delta through its up block.
    """
    from .dit_keys import WHOLE, diffusers_to_original, fuse_modules, targets_for

    if naming not in ("kohya", "comfyui"):
        raise LoRAFormatError(f"naming {naming!r} is not one of kohya, comfyui", value=naming, limit=("kohya", "comfyui"))
    arch = _dit_arch(lora, arch)

    groups: dict[str, tuple[tuple[Any, ...], dict[str, Module]]] = {}
    for path, module in lora.components["transformer"].items():
        found = diffusers_to_original(path, arch)
        if found is None:
            raise LoRAFormatError(
                f"transformer module {path!r} ({module.key}) has no name in the {arch} original layout",
                key=module.key,
                value=path,
                fix="write it with write_diffusers (ComfyUI reads that layout too).",
            )
        groups.setdefault(found[0], (found[1], {}))[1][path] = module
    out: dict[str, torch.Tensor] = {}
    record: dict[str, list[list[float]]] = {}
    for name, (targets, modules) in groups.items():
        key = "lora_unet_" + name.replace(".", "_") if naming == "kohya" else "diffusion_model." + name
        some = next(iter(modules.values()))
        targets = targets_for(name, targets, some.shape)
        parts = [(t, modules.get(t.path)) for t in targets]
        if len(targets) == 1 and targets[0].segments == WHOLE:
            fused = some
        else:
            fused = fuse_modules(parts, key)
            if isinstance(fused, LoRAModule) and not any(m is not None and fused.down is m.down for _, m in parts):
                record[key] = [[m.rank, m.alpha] if m is not None else [0, 0.0] for _, m in parts]
        put_module(out, key, fused, naming)
    for component, path, module in lora.modules():
        if component == "transformer":
            continue
        if component not in _COMFY_TE[arch]:
            raise LoRAFormatError(f"{arch} has no {component}", key=module.key, value=component,
                                  limit=tuple(_COMFY_TE[arch]))  # fmt: skip
        if naming == "kohya":
            name = kohya_module_name(component, path, te_prefix="lora_te1_")
        else:
            name = f"text_encoders.{_COMFY_TE[arch][component]}.transformer.{te_model_path(path, True)}"
        put_module(out, name, module, naming)
    return out, record


def write_kohya(
    lora: LoRA,
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    unet_names: str = "auto",
    provenance: Mapping[str, Any] | None = None,
    naming: str = "kohya",
) -> Path:
    """Write `lora` as a kohya file (see `to_kohya_state_dict`), atomically. `provenance` entries
    become ``loraloom.<key>`` metadata (strings as is, anything else as JSON); the source file's
    other metadata (kohya's ``ss_*`` keys, ...) is kept. A Flux / SD3 LoRA takes `naming` "comfyui"
    for ComfyUI's dotted original-layout names (`to_original_state_dict`)."""
    if "transformer" in lora.components:
        tensors, record = to_original_state_dict(lora, arch=arch, naming=naming)
        meta = _metadata(lora, "kohya", provenance)
        if record:
            meta[FUSED_PARTS_KEY] = json.dumps(record, sort_keys=True)
        return atomic_save(tensors, path, meta)
    if naming != "kohya":
        raise LoRAFormatError(f"naming {naming!r} is for Flux / SD3 LoRAs; an SD LoRA is written with kohya names",
                              value=naming, limit="kohya")  # fmt: skip
    tensors = to_kohya_state_dict(lora, arch=arch, unet_names=unet_names)
    return atomic_save(tensors, path, _metadata(lora, "kohya", provenance))


def _most_common(values: list[Any]) -> Any:
    # Ties go to the smallest value so the choice does not depend on module order.
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, n in counts.items() if n == best)


def adapter_config(lora: LoRA, component: str) -> dict[str, Any]:
    """diffusers/peft LoraConfig fields for one component: r and lora_alpha (the most common
    values), rank_pattern and alpha_pattern (every module that differs, by full canonical path,
    which peft matches as a suffix of the live module name; "^"-anchored for a transformer),
    target_modules (sorted)."""
    modules = lora.components[component]
    ranks = {p: m.rank for p, m in modules.items()}
    alphas = {p: m.alpha for p, m in modules.items()}
    r = _most_common(list(ranks.values()))
    alpha = _most_common(list(alphas.values()))
    # peft takes the first pattern key that matches the end of a module name, so a top-level path
    # ("proj_out") would also claim every "*.proj_out" of a transformer (Flux's 38 single blocks).
    # A transformer's paths are its live module names: anchored with "^" they match only themselves.
    anchor = "^" if component == "transformer" else ""
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {anchor + p: v for p, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {anchor + p: v for p, v in sorted(alphas.items()) if v != alpha},
        "target_modules": sorted(modules),
        "use_dora": False,
        "use_rslora": False,
        "lora_bias": False,
    }


def require_lora_module(component: str, path: str, module: Module, why: str, alternative: str = "") -> LoRAModule:
    """`module` if it is a LoRA pair; else LoRAFormatError naming it, `why`, and the `as_lora` fix."""
    if isinstance(module, LoRAModule):
        return module
    raise LoRAFormatError(
        f"module {component}.{path} ({module.key}) is {module.kind}: {why}",
        key=module.key,
        value=module.kind,
        limit="lora",
        fix=f"convert it with loraloom.lora.convert.as_lora(lora) (exact, or rank=N by SVD) {alternative}".strip(),
    )


def to_diffusers_state_dict(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, flat adapter metadata) in diffusers' format; tensors are shared, not copied.
    Raises LoRAFormatError for LoHa/LoKr modules (Fix: `convert.as_lora`)."""
    tensors: dict[str, torch.Tensor] = {}
    adapter_meta: dict[str, Any] = {}
    for component, path, module in lora.modules():
        require_lora_module(component, path, module, "diffusers' LoRA format cannot hold it", "or write kohya format.")
        name = path if component not in TEXT_ENCODERS else te_model_path(path, True)
        tensors[f"{component}.{name}.lora_A.weight"] = module.down
        tensors[f"{component}.{name}.lora_B.weight"] = module.up
    for component in lora.components:
        for key, value in adapter_config(lora, component).items():
            adapter_meta[f"{component}.{key}"] = value
    return tensors, adapter_meta


def write_diffusers(lora: LoRA, path: str | os.PathLike, *, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write `lora` in diffusers' format with its ``lora_adapter_metadata`` (the same JSON layout
    diffusers' `save_lora_weights` writes), atomically; `provenance` as in `write_kohya`."""
    tensors, adapter_meta = to_diffusers_state_dict(lora)
    meta = _metadata(lora, "diffusers", provenance)
    meta[ADAPTER_METADATA_KEY] = json.dumps(adapter_meta, indent=2, sort_keys=True)
    return atomic_save(tensors, path, meta)
