"""Read any supported LoRA file into the canonical `LoRA` value, detecting its format.

Formats (`FORMATS`), all detected from the key names alone:

- ``diffusers``: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (or the older
  ``.lora.down.weight`` / ``attn1.processor.to_q_lora.down.weight`` forms), ``text_encoder.`` and
  ``text_encoder_2.`` likewise, with or without diffusers' ``lora_adapter_metadata``. With it, each
  module's alpha comes from ``lora_alpha`` / ``alpha_pattern`` exactly as peft resolves them;
  without it alpha = rank (scale 1), which is what diffusers does.
- ``peft``: a peft state dict, ``base_model.model.<module>.lora_A.weight`` (adapter names inside
  the keys are accepted). An ``adapter_config.json`` beside the file (peft's ``save_pretrained``
  folder) supplies alpha; without one alpha = rank.
- ``kohya``: kohya-ss / A1111 names with diffusers-style module paths,
  ``lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight``, ``lora_te_`` (SD1.x) or
  ``lora_te1_`` / ``lora_te2_`` (SDXL), per-module ``.alpha``; without ``.alpha`` alpha = rank,
  as ComfyUI, A1111 and diffusers do.
- ``kohya-sgm``: the same with SGM/LDM UNet names (``lora_unet_input_blocks_4_1_...``,
  ``middle_block``, ``output_blocks``, resnet ``in_layers_2`` / ``out_layers_3`` /
  ``emb_layers_1`` / ``skip_connection``), as kohya writes SDXL LoRAs.

Flux and SD3 (component ``transformer``, canonical paths = diffusers' module paths; see `dit_keys`):

- ``diffusers`` / ``peft`` as above with ``transformer.`` (AI-Toolkit, SimpleTuner) or
  ``base_model.model.transformer_blocks...`` keys, per-module ``.alpha`` keys accepted;
- ``kohya-flux`` / ``kohya-sd3``: kohya names of the original modules
  (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_joint_blocks_0_x_block_attn_qkv``),
  ``lora_te1_`` CLIP-L, ``lora_te2_`` T5 (Flux) or CLIP-G (SD3), ``lora_te3_`` T5 (SD3);
- ``bfl`` / ``sd3-original``: the original names with dots, as ComfyUI writes them
  (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``, ``text_encoders.clip_l.transformer.``);
- ``xlabs``: ``double_blocks.0.processor.qkv_lora1.down.weight`` and friends;
- ``onetrainer`` / ``simpletuner-lycoris``: kohya-style keys on underscored diffusers paths
  (``lora_transformer_single_transformer_blocks_0_proj_mlp``, ``lycoris_transformer_blocks_0_attn_to_q``).

Fused original projections (qkv, Flux's single-block ``linear1``) are split exactly onto diffusers'
separate modules; a key that names no module of the layout is an error naming it.

In every naming a module may be a LoRA pair (LoCon conv layers: 4-D down, 1x1 up), a LyCORIS
LoHa (``hada_w1_a`` ...) or LoKr (``lokr_w1`` ...). DoRA (``dora_scale`` /
``lora_magnitude_vector``), LoCon Tucker (``lora_mid``) and bias LoRAs are refused with a clear
error rather than silently dropped (diffusers drops DoRA with a warning).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .canonical import TEXT_ENCODERS, LoHaModule, LoKrModule, LoRA, LoRAModule, Module, state_dict_fingerprint
from .errors import LoRAError, LoRAFormatError
from .keymap import KOHYA_PREFIXES, is_sgm_name, kohya_names_to_paths, normalize_te_path, rename_with_diffusers

FORMATS = {
    "diffusers": "unet.<module>.lora_A.weight / text_encoder(_2).<module>..., optional lora_adapter_metadata",
    "peft": "base_model.model.<module>.lora_A.weight, optional adapter_config.json beside the file",
    "kohya": "lora_unet_down_blocks_..., lora_te_ / lora_te1_ / lora_te2_, .alpha, lora_down / lora_up",
    "kohya-sgm": "kohya with SGM/LDM UNet names: lora_unet_input_blocks_4_1_..., middle_block, output_blocks",
    "kohya-flux": "kohya Flux: lora_unet_double_blocks_N_img_attn_qkv, lora_unet_single_blocks_N_linear1, "
    "lora_te1_ (CLIP-L), lora_te2_ (T5), .alpha",
    "kohya-sd3": "kohya SD3: lora_unet_joint_blocks_N_x_block_attn_qkv / _context_block_..., lora_te1_/2_/3_",
    "bfl": "Flux original (BFL / ComfyUI) names: [diffusion_model.]double_blocks.N.img_attn.qkv.lora_A.weight, "
    "single_blocks.N.linear1, text_encoders.clip_l.transformer.",
    "sd3-original": "SD3 original (ComfyUI) names: [diffusion_model.]joint_blocks.N.x_block.attn.qkv.lora_A.weight",
    "xlabs": "XLabs Flux: double_blocks.N.processor.qkv_lora1.down.weight, proj_lora1/2, single_blocks qkv_lora",
    "onetrainer": "OneTrainer Flux / SD3: lora_transformer_<diffusers path with _>.lora_down.weight, lora_te1_ ...",
    "simpletuner-lycoris": "SimpleTuner LyCORIS: lycoris_<diffusers transformer path with _>.lokr_w1 ...",
}
"""Format name -> what its keys look like."""

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
FUSED_PARTS_KEY = "loraloom.fused_parts"
"""Metadata of a kohya Flux / SD3 file written by LoRA Loom: {fused module: [[rank, alpha] per part]}
for fused modules written with stacked downs, so reading splits them back exactly."""
PEFT_PREFIX = "base_model.model."
_DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_CONFIG_MAX_BYTES = 4 * 2**20

_LYCORIS_ROLES = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
)  # fmt: skip
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", **{r: r for r in _LYCORIS_ROLES}}
_UNSUPPORTED = {
    "dora_scale": "DoRA (dora_scale)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "lora_mid.weight": "LoCon Tucker (lora_mid)",
    "lora_up.bias": "a LoRA bias",
    "lora_B.bias": "a LoRA bias",
    "diff": "a full weight difference (diff)",
    "diff_b": "a full bias difference (diff_b)",
    "w_norm": "a norm-layer patch (w_norm)",
    "b_norm": "a norm-layer patch (b_norm)",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
}
_UNSUPPORTED_FIX = "re-export it as a plain LoRA, LoCon, LoHa or LoKr (e.g. with kohya's or LyCORIS' tools)."
# peft-style keys: lora_A / lora_B with an optional adapter name, or diffusers' older spellings.
_PEFT_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"(?P<ab>lora_[AB])(?:\.[A-Za-z0-9_-]+)?\.weight"
    r"|lora[._](?P<ud>down|up)\.weight"
    r"|(?P<role>alpha|" + "|".join(_LYCORIS_ROLES) + r")"
    r"|(?P<bad>" + "|".join(re.escape(k) for k in _UNSUPPORTED) + r")(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?"
    r")$"
)
_FOREIGN = (
    (("double_blocks", "single_blocks", "single_transformer_blocks"), "Flux"),
    (("joint_blocks", "context_embedder"), "SD3"),
    (("transformer_blocks.0.attn.add_q_proj",), "a DiT model (Flux/SD3)"),
)
_DIT_FORMATS = ("kohya-flux", "kohya-sd3", "bfl", "sd3-original", "xlabs", "onetrainer", "simpletuner-lycoris")
# kohya-style prefixes before an underscored diffusers transformer path (ComfyUI reads both)
_DIFFUSERS_KOHYA = {"lora_transformer_": "onetrainer", "lycoris_": "simpletuner-lycoris"}
_ORIGINAL_PREFIX = "diffusion_model."
# ComfyUI's text-encoder names in the original layouts -> component, per architecture
_ORIGINAL_TE = {
    "flux": {"text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.t5xxl.transformer.": "text_encoder_2"},
    "sd3": {"text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.clip_g.transformer.": "text_encoder_2",
            "text_encoders.t5xxl.transformer.": "text_encoder_3"},
}  # fmt: skip
# XLabs' processor LoRAs -> the original module they add to (x-flux's DoubleStreamBlockLoraProcessor:
# qkv_lora1 / proj_lora1 on the image stream, _2 on the text stream; SingleStreamBlockLoraProcessor:
# qkv_lora on linear1's first 3 * hidden rows, proj_lora on linear2). x-flux scales by
# network_alpha / rank only when given one; its files carry no alpha, so alpha = rank.
_XLABS = {
    "double_blocks": {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv",
                      "proj_lora1": "img_attn.proj", "proj_lora2": "txt_attn.proj"},
    "single_blocks": {"qkv_lora": "linear1_qkv", "proj_lora": "linear2"},
}  # fmt: skip
_XLABS_KEY = re.compile(r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.([a-z_0-9]+)\.(down|up)\.weight$")
_T5_KOHYA = re.compile(r"^encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wi|wo)$")


def read_lora(path: str | os.PathLike, *, component: str | None = None, layers_per_block: int = 2,
              known_fingerprint=None) -> LoRA:
    """Read a LoRA file (safetensors, through safefile's strict reader) into a canonical `LoRA`.

    `path` may also be a peft ``save_pretrained`` folder (``adapter_model.safetensors`` +
    ``adapter_config.json``). `component` names the component of a peft file (guessed from the
    module paths otherwise). `layers_per_block` sets SGM block numbering (2 for SD1.x and SDXL).
    `known_fingerprint` (the file's digest, already computed by the caller: see `read_lora_file`)
    skips hashing it again.
    Raises LoRAFileError (bad file) or LoRAFormatError (keys that are no LoRA we can read).
    """
    from .safefile import read_lora_file

    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    safe = read_lora_file(path, known_fingerprint=known_fingerprint)
    return lora_from_state_dict(
        safe.tensors,
        safe.metadata,
        path=str(path),
        fingerprint=safe.fingerprint,
        peft_config=_adapter_config_beside(path),
        component=component,
        layers_per_block=layers_per_block,
    )


def _json(text: str | bytes, what: str, **where: Any) -> Any:
    """JSON from a LoRA's files, read as strictly as a workflow (no NaN, duplicate keys, deep nesting
    or endless integers: json.loads alone raises RecursionError or ValueError on those)."""
    from ..graph_runtime.errors import WorkflowError
    from ..graph_runtime.jsonio import loads_strict

    try:
        return loads_strict(text, source=what)
    except WorkflowError as exc:
        raise LoRAFormatError(str(exc), value=exc.value, limit=exc.limit, kind=exc.kind, **where) from None


def _adapter_config_beside(path: Path) -> dict[str, Any] | None:
    config = path.with_name("adapter_config.json")
    if not config.is_file():
        return None
    size = config.stat().st_size
    if size > _CONFIG_MAX_BYTES:
        raise LoRAFormatError(
            f"adapter_config.json is {size} bytes, above the {_CONFIG_MAX_BYTES}-byte limit",
            path=str(config),
            value=size,
            limit=_CONFIG_MAX_BYTES,
        )
    data = _json(config.read_bytes(), "adapter_config.json", path=str(config))
    if not isinstance(data, dict):
        raise LoRAFormatError("adapter_config.json is not a JSON object", path=str(config), value=type(data).__name__)
    return data


def detect_format(keys: list[str] | Any, *, path: str | None = None) -> str:
    """Name the format (a key of `FORMATS`) of a LoRA state dict from its keys.

    Raises LoRAFormatError for mixed or unknown key forms, listing the first keys found and, when
    the names give it away, the architecture they were made for.
    """
    keys = list(keys)
    if not keys:
        raise LoRAFormatError("the file holds no tensors", path=path, value=0, limit=">= 1 tensor")
    for prefix, fmt in _DIFFUSERS_KOHYA.items():
        if any(k.startswith(prefix) for k in keys):
            others = [k for k in keys if not k.startswith((prefix, *KOHYA_PREFIXES))]
            if others:
                raise LoRAFormatError(
                    f"{fmt} keys ({prefix}...) mixed with {len(others)} other key(s), first {others[:3]}",
                    path=path,
                    key=others[0],
                )
            return fmt
    kohya = [k for k in keys if k.startswith(tuple(KOHYA_PREFIXES))]
    if kohya:
        kohya_set = set(kohya)
        others = [k for k in keys if k not in kohya_set]
        if others:
            raise LoRAFormatError(
                f"kohya keys ({kohya[0]!r}) mixed with {len(others)} non-kohya key(s), first {others[:3]}",
                path=path,
                key=others[0],
            )
        dit = _kohya_dit_arch(kohya)
        if dit is not None:
            return f"kohya-{dit}"
        return "kohya-sgm" if any(is_sgm_name(k.split(".", 1)[0]) for k in kohya) else "kohya"
    original = _original_format(keys)
    if original is not None:
        return original
    if all(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if all(k.split(".", 1)[0] in _DIFFUSERS_COMPONENTS for k in keys):
        return "diffusers"
    foreign = _foreign_arch(keys)
    if foreign is None and all(_PEFT_SUFFIX.match(k) for k in keys):
        prefixes = {k.split(".", 1)[0] for k in keys}
        if not prefixes & {"transformer", "diffusion_model", "model"}:
            return "peft"
    made_for = f" They look made for {foreign}, but match none of its known layouts." if foreign else ""
    raise LoRAFormatError(
        f"unknown LoRA key format: first keys {keys[:4]}.{made_for} Known formats: "
        + "; ".join(f"{name}: {what}" for name, what in FORMATS.items()),
        path=path,
        key=keys[0],
        limit=tuple(FORMATS),
    )


def _kohya_dit_arch(kohya_keys: list[str]) -> str | None:
    """"flux" / "sd3" when the kohya UNet names are a DiT's original module names."""
    from .dit_keys import original_archs

    found: set[str] = set()
    for key in kohya_keys:
        if key.startswith("lora_unet_"):
            archs = original_archs(key.split(".", 1)[0][len("lora_unet_") :])
            if len(archs) == 1:
                return next(iter(archs))
            found |= archs
    # only names both have (final_layer_...): read as Flux, the far more common one
    return "flux" if found else None


def _original_format(keys: list[str]) -> str | None:
    """"xlabs", "bfl" or "sd3-original" when every key is in that original layout (optionally under
    ComfyUI's ``diffusion_model.`` prefix), else None."""
    from .dit_keys import original_archs

    if all(_XLABS_KEY.match(k) for k in keys):
        return "xlabs"
    archs = {"flux", "sd3"}
    for key in keys:
        name = key[len(_ORIGINAL_PREFIX) :] if key.startswith(_ORIGINAL_PREFIX) else key
        if name.startswith("text_encoders."):
            continue
        m = _PEFT_SUFFIX.match(name)
        archs &= original_archs(m.group("module")) if m else set()
        if not archs:
            return None
    # names both have only (final_layer...): read as Flux, the far more common one
    return "bfl" if "flux" in archs else "sd3-original"


def _foreign_arch(keys: list[str]) -> str | None:
    for markers, arch in _FOREIGN:
        if any(m in k for k in keys for m in markers):
            return arch
    return None


def lora_from_state_dict(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    path: str | None = None,
    fingerprint: str | None = None,
    peft_config: Mapping[str, Any] | None = None,
    component: str | None = None,
    layers_per_block: int = 2,
) -> LoRA:
    """Build a canonical `LoRA` from a state dict in any supported format (see `FORMATS`).

    Tensors are kept as given (no copies, same dtype). `fingerprint` defaults to a content hash of
    the dict (`state_dict_fingerprint`); `peft_config` is a peft ``adapter_config.json`` dict for
    peft-format dicts.
    """
    metadata = dict(metadata or {})
    fmt = detect_format(tensors.keys(), path=path)
    notes: list[str] = [f"format {fmt}"]
    try:
        components: dict[str, dict[str, Module]] = {}
        alpha_sources: set[str] = set()
        located: dict[tuple[str, str], tuple[str, dict[str, torch.Tensor]]] = {}
        configs: dict[str, Mapping[str, Any]] = {}
        if fmt in _DIT_FORMATS:
            components, alpha_sources = _read_dit(tensors, fmt, metadata, path, notes)
        elif fmt.startswith("kohya"):
            grouped = _group_kohya(tensors, path)
            names = kohya_names_to_paths(grouped, layers_per_block=layers_per_block, path=path)
            located = {names[name]: (name, roles) for name, roles in grouped.items()}
        else:
            located, configs = _group_peft_style(tensors, metadata, fmt, peft_config, component, path, notes)
        for (comp, module_path), (key, roles) in located.items():
            module, source = _build_module(key, roles, configs.get(comp), comp, module_path, path)
            components.setdefault(comp, {})[module_path] = module
            alpha_sources.add(source)
    except LoRAError as exc:
        raise exc.at(file=path)
    for source in sorted(alpha_sources):
        notes.append(f"alpha from {source}")
    return LoRA(
        components=components,
        source_format=fmt,
        metadata=metadata,
        fingerprint=fingerprint or state_dict_fingerprint(tensors, metadata),
        path=path,
        notes=tuple(notes),
    )


def _unsupported(key: str, what: str, path: str | None) -> LoRAFormatError:
    return LoRAFormatError(
        f"key {key!r} is {what}, which LoRA Loom does not apply", path=path, key=key, fix=_UNSUPPORTED_FIX
    )


def _group_kohya(tensors: Mapping[str, torch.Tensor], path: str | None) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix in _UNSUPPORTED:
            raise _unsupported(key, _UNSUPPORTED[suffix], path)
        role = _KOHYA_ROLES.get(suffix)
        if role is None:
            raise LoRAFormatError(
                f"key {key!r}: unknown kohya suffix {suffix!r}; known: {', '.join(_KOHYA_ROLES)}",
                path=path,
                key=key,
                value=suffix,
                limit=tuple(_KOHYA_ROLES),
            )
        grouped.setdefault(name, {})[role] = tensor
    return grouped


def _group_peft_style(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    fmt: str,
    peft_config: Mapping[str, Any] | None,
    component: str | None,
    path: str | None,
    notes: list[str],
) -> tuple[dict[tuple[str, str], tuple[str, dict[str, torch.Tensor]]], dict[str, Mapping[str, Any]]]:
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if fmt == "diffusers":
            comp, _, rest = key.partition(".")
        else:
            rest = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            comp = component or _guess_component(rest)
            if comp not in _DIFFUSERS_COMPONENTS:
                raise LoRAFormatError(
                    f"component {comp!r} is not one of {', '.join(_DIFFUSERS_COMPONENTS)}",
                    path=path,
                    key=key,
                    value=comp,
                    limit=_DIFFUSERS_COMPONENTS,
                )
        by_component.setdefault(comp, {})[rest] = tensor
    configs: dict[str, Mapping[str, Any]] = {}
    if fmt == "diffusers":
        configs = _diffusers_adapter_configs(metadata, path)
        notes.append("lora_adapter_metadata present" if configs else "no lora_adapter_metadata")
    elif peft_config is not None:
        configs = {comp: peft_config for comp in by_component}
        notes.append("adapter_config.json beside the file")
    located: dict[tuple[str, str], tuple[str, dict[str, torch.Tensor]]] = {}
    for comp, part in by_component.items():
        # diffusers' legacy renames are UNet / CLIP ones; transformer keys are peft names already
        renamed = rename_with_diffusers(part, comp) if comp != "transformer" else {}
        for old_key, tensor in part.items():
            new_key = renamed.get(old_key, old_key)
            m = _PEFT_SUFFIX.match(new_key)
            full_key = f"{comp}.{old_key}" if fmt == "diffusers" else old_key
            if m is None:
                raise LoRAFormatError(
                    f"key {full_key!r}: not a LoRA weight (expected <module>.lora_A.weight, "
                    "<module>.lora_B.weight, <module>.alpha or a LyCORIS hada_/lokr_ suffix)",
                    path=path,
                    key=full_key,
                )
            role = _role(m, full_key, path)
            module_path = m.group("module")
            if comp in TEXT_ENCODERS:
                module_path = normalize_te_path(module_path)
            prefix = f"{comp}." if fmt == "diffusers" else ""
            entry = located.setdefault((comp, module_path), (prefix + module_path, {}))
            entry[1][role] = tensor
    return located, configs


def _role(m: re.Match, key: str, path: str | None) -> str:
    """The role ("down", "up", "alpha" or a LyCORIS suffix) of a `_PEFT_SUFFIX` match."""
    if m.group("bad"):
        raise _unsupported(key, _UNSUPPORTED[m.group("bad")], path)
    return {"lora_A": "down", "lora_B": "up"}.get(m.group("ab") or "") or m.group("ud") or m.group("role")


_Source = tuple[str, dict[str, torch.Tensor], list[tuple[str, Any]], "str | None"]
# (file module name, tensors by role, [(component, dit_keys.Target)], original module name or None)


def _read_dit(
    tensors: Mapping[str, torch.Tensor], fmt: str, metadata: Mapping[str, str], path: str | None, notes: list[str]
) -> tuple[dict[str, dict[str, Module]], set[str]]:
    """(modules, alpha sources) of a Flux / SD3 file in an original layout (kohya, BFL / ComfyUI,
    XLabs), each fused original module split exactly onto diffusers' separate ones
    (`dit_keys.split_module`)."""
    from .dit_keys import WHOLE, check_tiling, split_module, split_stacked, targets_for

    arch = _dit_arch_of(fmt, tensors)
    stacked = _fused_parts(metadata, path)
    components: dict[str, dict[str, Module]] = {}
    owner: dict[tuple[str, str], str] = {}
    alpha_sources: set[str] = set()
    skipped: list[str] = []
    for key, roles, targets, name in _dit_sources(tensors, fmt, arch, path):
        component, first = targets[0]
        module, source = _build_module(key, roles, None, component, first.path, path)
        alpha_sources.add(source)
        if name is not None:
            fitted = targets_for(name, tuple(t for _, t in targets), module.shape)
            targets = [(component, t) for t in fitted]
        if len(targets) > 1 or targets[0][1].segments != WHOLE:
            check_tiling([t for _, t in targets], module.shape, key)
        if key in stacked and isinstance(module, LoRAModule):
            pieces = split_stacked(module, [t for _, t in targets], stacked[key], key)
        else:
            pieces = [split_module(module, t.segments, key) for _, t in targets]
        for (comp, target), part in zip(targets, pieces):
            if part is None:
                continue
            if len(targets) > 1 and _is_zero(part):
                # An all-zero part changes nothing; kohya / ComfyUI files written from LoRAs that
                # lack some of q/k/v carry zero rows for them, and reading those back must not add modules.
                skipped.append(f"{key} -> {target.path}")
                continue
            where = (comp, target.path)
            if where in owner:
                raise LoRAFormatError(
                    f"modules {owner[where]!r} and {key!r} both change {comp}.{target.path}",
                    path=path,
                    key=key,
                    value=target.path,
                )
            owner[where] = key
            components.setdefault(comp, {})[target.path] = part
    notes.append(f"{arch} original layout: fused projections split onto diffusers' modules")
    if skipped:
        notes.append(f"{len(skipped)} all-zero part(s) of fused modules not kept, first: {skipped[0]}")
    return components, alpha_sources


def _dit_arch_of(fmt: str, keys: Any) -> str:
    """"flux" or "sd3": from the format, or for diffusers-named kohya-style files (OneTrainer,
    SimpleTuner LyCORIS) from their module names (SD3's T5 is lora_te3_; only Flux has single blocks)."""
    if fmt in ("kohya-sd3", "sd3-original"):
        return "sd3"
    if fmt in _DIFFUSERS_KOHYA.values():
        names = list(keys)
        if any("single_transformer_blocks_" in k for k in names):
            return "flux"
        if any(k.startswith("lora_te3_") or "_attn2_" in k or "pos_embed_" in k for k in names):
            return "sd3"
    return "flux"


def _fused_parts(metadata: Mapping[str, str], path: str | None) -> dict[str, list[tuple[int, float]]]:
    raw = metadata.get(FUSED_PARTS_KEY)
    if raw is None:
        return {}
    data = _json(raw, f"metadata {FUSED_PARTS_KEY!r}", path=path, key=FUSED_PARTS_KEY)
    ok = isinstance(data, dict) and all(
        isinstance(parts, list) and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
            and p[0] >= 0 and isinstance(p[1], (int, float)) and not isinstance(p[1], bool) for p in parts)
        for parts in data.values()
    )  # fmt: skip
    if not ok:
        raise LoRAFormatError(
            f"metadata {FUSED_PARTS_KEY!r} is not a map of module name -> [[rank, alpha], ...]",
            path=path,
            key=FUSED_PARTS_KEY,
            value=raw[:200],
        )
    return {name: [(int(r), float(a)) for r, a in parts] for name, parts in data.items()}


def _is_zero(module: Module) -> bool:
    if isinstance(module, LoRAModule):
        return not bool(module.up.any())
    if isinstance(module, LoHaModule):
        return not bool(module.w1a.any()) or not bool(module.w2a.any())
    w1 = module.w1 if module.w1 is not None else module.w1a
    return not bool(w1.any())


def _dit_sources(tensors: Mapping[str, torch.Tensor], fmt: str, arch: str, path: str | None) -> list[_Source]:
    """Group a DiT file's keys by module and name each module's targets; every key that names no
    module of the layout is collected and raised together (the first five named)."""
    from .dit_keys import Target, diffusers_path_of_underscored, original_targets

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    located: dict[str, tuple[list[tuple[str, Any]], str | None]] = {}
    unknown: list[str] = []
    if fmt.startswith("kohya") or fmt in _DIFFUSERS_KOHYA.values():
        grouped = _group_kohya(tensors, path)
        clip = []
        for name in grouped:
            prefix = next((p for p in _DIFFUSERS_KOHYA if name.startswith(p)), None)
            if prefix is not None:
                module_path = diffusers_path_of_underscored(name[len(prefix) :])
                if module_path is None:
                    unknown.append(name)
                else:
                    located[name] = ([("transformer", Target(module_path))], None)
                continue
            if name.startswith("lora_unet_"):
                found = original_targets(name[len("lora_unet_") :], arch, underscored=True)
                if found is None:
                    unknown.append(name)
                else:
                    located[name] = ([("transformer", t) for t in found[1]], found[0])
                continue
            t5 = _t5_path(name, arch)
            if t5 is not None:
                located[name] = ([(t5[0], Target(t5[1]))], None)
            else:
                clip.append(name)
        for name, (comp, module_path) in kohya_names_to_paths(clip, path=path).items():
            located[name] = ([(comp, Target(module_path))], None)
    else:
        te_prefixes = _ORIGINAL_TE[arch]
        for key, tensor in tensors.items():
            m = _XLABS_KEY.match(key) if fmt == "xlabs" else None
            if m is not None:
                blocks, index, proc, role = m.groups()
                name = f"{blocks}.{index}.processor.{proc}"
                original = _XLABS[blocks].get(proc)
                found = original_targets(f"{blocks}.{index}.{original}", arch) if original else None
            else:
                stripped = key[len(_ORIGINAL_PREFIX) :] if key.startswith(_ORIGINAL_PREFIX) else key
                sm = _PEFT_SUFFIX.match(stripped)
                if sm is None:
                    unknown.append(key)
                    continue
                role, module = _role(sm, key, path), sm.group("module")
                name = key[: len(key) - len(stripped)] + module  # the file's module name, prefix kept
                te = next((p for p in te_prefixes if module.startswith(p)), None)
                if te is not None:
                    located.setdefault(name, ([(te_prefixes[te], Target(normalize_te_path(module[len(te) :])))], None))
                    grouped.setdefault(name, {})[role] = tensor
                    continue
                found = original_targets(module, arch)
            if found is None:
                unknown.append(key)
                continue
            located.setdefault(name, ([("transformer", t) for t in found[1]], found[0]))
            grouped.setdefault(name, {})[role] = tensor
    if unknown:
        label = {"flux": "Flux", "sd3": "SD3"}[arch]
        layout = "transformer" if fmt in _DIFFUSERS_KOHYA.values() else "original layout"
        raise LoRAFormatError(
            f"{len(unknown)} key(s) match no module of {label}'s {layout} ({fmt}), first: {unknown[:5]}",
            path=path,
            key=unknown[0],
            value=len(unknown),
            fix="check that the file is a LoRA for this model; LoRA Loom never drops keys it cannot place.",
        )
    return [(name, grouped[name], targets, original) for name, (targets, original) in located.items()]


def _t5_path(name: str, arch: str) -> tuple[str, str] | None:
    """(component, module path) of a kohya T5 name (``lora_te2_encoder_block_0_layer_0_SelfAttention_q``
    on Flux, ``lora_te3_`` on SD3), else None."""
    prefix, component = ("lora_te2_", "text_encoder_2") if arch == "flux" else ("lora_te3_", "text_encoder_3")
    if not name.startswith(prefix):
        return None
    m = _T5_KOHYA.match(name[len(prefix) :])
    if m is None:
        return None
    block, layer, kind, proj = m.groups()
    return component, f"encoder.block.{block}.layer.{layer}.{kind}.{proj}"


_TRANSFORMER_TOP = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder",
                    "time_text_embed.", "norm_out.", "proj_out", "pos_embed.")  # fmt: skip


def _guess_component(module_path: str) -> str:
    if module_path.startswith(("text_model.", "encoder.layers.", "text_projection")):
        return "text_encoder"
    if module_path.startswith(_TRANSFORMER_TOP):
        return "transformer"  # Flux / SD3 (a UNet's transformer_blocks sit inside down_blocks...)
    return "unet"


def _diffusers_adapter_configs(metadata: Mapping[str, str], path: str | None) -> dict[str, Mapping[str, Any]]:
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return {}
    flat = _json(raw, f"metadata {ADAPTER_METADATA_KEY!r}", path=path, key=ADAPTER_METADATA_KEY)
    if not isinstance(flat, dict):
        raise LoRAFormatError(
            f"metadata {ADAPTER_METADATA_KEY!r} is not a JSON object", path=path, key=ADAPTER_METADATA_KEY
        )
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        comp, _, field_name = key.partition(".")
        if comp in _DIFFUSERS_COMPONENTS and field_name:
            configs.setdefault(comp, {})[field_name] = value
    return configs


def _config_alpha(config: Mapping[str, Any], component: str, module_path: str, rank: int, key: str, path: str | None) -> float:
    """Alpha for one module exactly as peft resolves it from a LoraConfig dict."""
    from peft.utils.other import get_pattern_key

    if config.get("use_dora"):
        raise _unsupported(key, "DoRA (use_dora in the adapter config)", path)
    names = [module_path] if component not in TEXT_ENCODERS else [module_path, "text_model." + module_path]
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = config.get("lora_alpha", 8)
    for name in names:
        pattern = get_pattern_key(list(alpha_pattern), name)
        if pattern in alpha_pattern:
            alpha = alpha_pattern[pattern]
            break
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LoRAFormatError(
            f"module {key!r}: adapter config alpha {alpha!r} is not a number", path=path, key=key, value=alpha
        )
    if config.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r); canonical alpha is what gives that scale as alpha / r.
        return float(alpha) * math.sqrt(rank)
    return float(alpha)


def _alpha_tensor(key: str, t: torch.Tensor, path: str | None) -> float:
    if t.numel() != 1:
        raise LoRAFormatError(
            f"key {key + '.alpha'!r}: alpha must be a scalar, got shape {tuple(t.shape)}",
            path=path,
            key=key + ".alpha",
            value=tuple(t.shape),
            limit="1 element",
        )
    return float(t.reshape(()).item())


def _build_module(
    key: str,
    roles: dict[str, torch.Tensor],
    config: Mapping[str, Any] | None,
    component: str,
    module_path: str,
    path: str | None,
) -> tuple[Module, str]:
    for role, t in roles.items():
        if not t.is_floating_point():
            raise LoRAFormatError(
                f"key {key}.{role}: dtype {t.dtype} is not a floating-point type",
                path=path,
                key=f"{key}.{role}",
                value=str(t.dtype),
            )
    names = set(roles) - {"alpha"}
    explicit_alpha = _alpha_tensor(key, roles["alpha"], path) if "alpha" in roles else None
    if names <= {"down", "up"}:
        missing = {"down", "up"} - names
        if missing:
            have = ", ".join(sorted(roles))
            raise LoRAFormatError(
                f"module {key!r} has {have} but no {missing.pop()} weight", path=path, key=key, value=sorted(roles)
            )
        down, up = roles["down"], roles["up"]
        if up.ndim >= 2 and down.ndim >= 1 and up.shape[1] != down.shape[0]:
            raise LoRAFormatError(
                f"module {key!r}: up/down ranks disagree: down (lora_A / lora_down) has rank {down.shape[0]} "
                f"{tuple(down.shape)}, up (lora_B / lora_up) has rank {up.shape[1]} {tuple(up.shape)}",
                path=path,
                key=key,
                value=int(up.shape[1]),
                limit=int(down.shape[0]),
            )
        rank = int(down.shape[0])
        if explicit_alpha is not None:
            alpha, source = explicit_alpha, ".alpha keys"
        elif config:
            alpha, source = _config_alpha(config, component, module_path, rank, key, path), "adapter config"
        else:
            alpha, source = float(rank), "default alpha = rank (scale 1)"
        return LoRAModule(down=down, up=up, alpha=alpha, key=key), source
    if names and all(n.startswith("hada_") for n in names):
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        _require(key, names, need, path)
        rank = int(roles["hada_w1_b"].shape[0])
        alpha, source = (explicit_alpha, ".alpha keys") if explicit_alpha is not None else (float(rank), "default alpha = rank (scale 1)")
        return (
            LoHaModule(
                w1a=roles["hada_w1_a"], w1b=roles["hada_w1_b"], w2a=roles["hada_w2_a"], w2b=roles["hada_w2_b"],
                t1=roles.get("hada_t1"), t2=roles.get("hada_t2"), alpha=alpha, key=key,
            ),
            source,
        )  # fmt: skip
    if names and all(n.startswith("lokr_") for n in names):
        module = LoKrModule(
            alpha=0.0, w1=roles.get("lokr_w1"), w1a=roles.get("lokr_w1_a"), w1b=roles.get("lokr_w1_b"),
            w2=roles.get("lokr_w2"), w2a=roles.get("lokr_w2_a"), w2b=roles.get("lokr_w2_b"),
            t2=roles.get("lokr_t2"), key=key,
        )  # fmt: skip
        if explicit_alpha is not None:
            return dataclasses.replace(module, alpha=explicit_alpha), ".alpha keys"
        return dataclasses.replace(module, alpha=float(module.rank or 1)), "default alpha = rank (scale 1)"
    raise LoRAFormatError(
        f"module {key!r} mixes tensors of different kinds: {sorted(roles)}", path=path, key=key, value=sorted(roles)
    )


def _require(key: str, names: set[str], need: set[str], path: str | None) -> None:
    missing = need - names
    if missing:
        raise LoRAFormatError(
            f"module {key!r} lacks {', '.join(sorted(missing))} (has {', '.join(sorted(names))})",
            path=path,
            key=key,
            value=sorted(names),
            limit=sorted(need),
        )
