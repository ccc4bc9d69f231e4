"""config="auto" for a Flux / SD3.5 transformer file: where the other parts of its pipeline are (the
text encoders and the VAE, found offline the way ComfyUI users keep them), and the whole pipeline's
configs, each derived from the header of the file that holds it (``bases.dit_config``) and checked
to fit the transformer before anything is built.

Each part is looked for, in order, inside the checkpoint itself (all-in-one files keep them under
``text_encoders.<name>.transformer.`` and ``first_stage_model.``), then by its usual file name in the
folders the caller gives per ComfyUI folder kind (``text_encoders``: ComfyUI's models/text_encoders and
models/clip; ``vae``: models/vae; extra_model_paths.yaml included where ComfyUI runs). A file found by
name must hold the part's marker key (read from its header only), so a wrong file is named, never
loaded. Everything missing is reported at once, with every place looked at. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..lora.arches import ARCHES
from .arch import VAE_PREFIX, BaseModelError


@dataclass(frozen=True)
class Part:
    """One part besides the transformer: its pipeline component, ComfyUI's name for it, the ComfyUI
    folder kind it lives in, its usual file names, its prefix inside an all-in-one file, and a key
    every file of it holds (after the prefix)."""

    component: str
    name: str
    folder: str
    file_names: tuple[str, ...]
    prefix: str
    marker: str


_CLIP_L = Part("text_encoder", "clip_l", "text_encoders", ("clip_l.safetensors",), "text_encoders.clip_l.transformer.",
               "text_model.embeddings.token_embedding.weight")
_CLIP_G = Part("text_encoder_2", "clip_g", "text_encoders", ("clip_g.safetensors",), "text_encoders.clip_g.transformer.",
               "text_model.embeddings.token_embedding.weight")
# fp8 copies are read too (upcast to the pipeline's dtype as they load: what ComfyUI computes with too)
_T5 = ("t5xxl", "text_encoders", ("t5xxl_fp16.safetensors", "t5xxl_fp32.safetensors", "t5xxl_fp8_e4m3fn.safetensors"),
       "text_encoders.t5xxl.transformer.", "shared.weight")
_VAE = (VAE_PREFIX, "decoder.conv_in.weight")
PARTS: dict[str, tuple[Part, ...]] = {
    # FluxPipeline: CLIP-L pooled, T5-XXL sequence, the 16-channel VAE (BFL's ae.safetensors)
    "flux": (_CLIP_L, Part("text_encoder_2", *_T5), Part("vae", "vae", "vae", ("ae.safetensors",), *_VAE)),
    # StableDiffusion3Pipeline: CLIP-L and CLIP-G pooled, T5-XXL sequence, SD3's VAE
    "sd3": (_CLIP_L, _CLIP_G, Part("text_encoder_3", *_T5),
            Part("vae", "vae", "vae", ("sd3.5_vae.safetensors", "sd3_vae.safetensors"), *_VAE)),
}
_FIX = ("put the missing files into ComfyUI's models/text_encoders (or models/clip) and models/vae folders, as "
        "ComfyUI's own Flux / SD3.5 workflows use them, or choose a config folder (a diffusers folder of the model)")


@dataclass(frozen=True)
class Found:
    """Where one part's weights are: the file and the prefix of its keys there ("" for its own file);
    for a file of its own, its tensors' shapes by key as its header (read once, to find it) says."""

    path: Path
    prefix: str
    shapes: Mapping[str, Sequence[int]] | None = field(default=None, compare=False, repr=False)


def find_parts(arch: str, checkpoint: Path, checkpoint_keys: Iterable[str],
               folders: Mapping[str, Sequence[Path]]) -> dict[str, Found]:
    """Component -> where its weights are, for every part of an ``arch`` ("flux" / "sd3") pipeline
    besides the transformer of ``checkpoint`` (whose tensor names are ``checkpoint_keys``);
    ``folders``: ComfyUI folder kind ("text_encoders", "vae") -> the folders searched, in order.
    Raises BaseModelError (kind "parts_missing") naming every part not found and where it looked,
    or (kind "part_mismatch") a file found by name that is not that part."""
    from .checks import weights_header

    keys = set(checkpoint_keys)
    found: dict[str, Found] = {}
    missing: dict[str, str] = {}  # part name -> what was looked for, where
    for part in PARTS[arch]:
        if part.prefix + part.marker in keys:
            found[part.component] = Found(checkpoint, part.prefix)
            continue
        places = [Path(d) for d in folders.get(part.folder, ())]
        path = next((d / name for name in part.file_names for d in places if (d / name).is_file()), None)
        if path is None:
            looked = ", ".join(str(d) for d in places) or f"no {part.folder} folder"
            missing[part.name] = f"{' or '.join(part.file_names)}; looked in {checkpoint.name}, {looked}"
            continue
        tensors = weights_header(path).tensors
        if part.marker not in tensors:
            raise BaseModelError(f"is not a {part.name} file: it lacks {part.marker!r}, which every {part.name} "
                                 "file holds.", file=path, key=part.marker, value=part.name, kind="part_mismatch",
                                 fix=f"put the {part.name} file of the {arch} model there under this name")
        found[part.component] = Found(path, "", {key: info.shape for key, info in tensors.items()})
    if missing:
        raise BaseModelError(
            f"holds the {ARCHES[arch].label} transformer; config 'auto' needs the other parts of the pipeline too and did "
            f"not find: {'; '.join(f'{name} ({where})' for name, where in missing.items())}.", file=checkpoint,
            value=list(missing),
            kind="parts_missing", fix=_FIX)
    return found


T5_TOKENIZER = "t5_tokenizer"
"""The ``folders`` kind naming the folders searched for the T5 tokenizer (before the Hugging Face cache)."""
# Flux schnell has no guidance embedding and samples unshifted (its published scheduler config);
# dev's shift grows with the image's token count.
SCHEDULER_SCHNELL = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
_TOKENIZER_CLASS = {"clip_l": "CLIPTokenizer", "clip_g": "CLIPTokenizer", "t5xxl": "T5TokenizerFast"}


def _mismatch(found: Found, key: str, what: str, value, limit, arch: str) -> BaseModelError:
    label = ARCHES[arch].label
    return BaseModelError(f"{what} is {value}, but the {label} transformer needs {limit}: this file is of another "
                          "model.", file=found.path, key=found.prefix + key, key_label="tensor", value=value, limit=limit,
                          kind="part_mismatch", fix=f"use the files of the same {label} model (or a config folder)")


def _fit(arch: str, transformer: Mapping, configs: Mapping[str, dict], found: Mapping[str, Found]) -> None:
    """Refuse a part whose shapes do not fit the transformer (part_mismatch, naming file and key):
    the T5 width is the transformer's context width; the pooled width is CLIP-L's (Flux) or the sum
    of CLIP-L's and CLIP-G's projections (SD3.5, which pads their joint hidden states to T5's width);
    the VAE's latent channels are the transformer's input (Flux packs 2x2 latent patches: 4x)."""
    t5 = next(c for c, p in zip(configs, PARTS[arch]) if p.name == "t5xxl")
    if configs[t5]["d_model"] != transformer["joint_attention_dim"]:
        raise _mismatch(found[t5], "shared.weight", "the T5 encoder's width", configs[t5]["d_model"],
                        transformer["joint_attention_dim"], arch)
    pooled = transformer["pooled_projection_dim"]
    if arch == "flux":
        width = configs["text_encoder"]["hidden_size"]
        if width != pooled:
            raise _mismatch(found["text_encoder"], "text_model.embeddings.token_embedding.weight",
                            "the CLIP-L encoder's width", width, pooled, arch)
    else:
        for component in ("text_encoder", "text_encoder_2"):
            if "CLIPTextModelWithProjection" not in configs[component]["architectures"]:
                raise _mismatch(found[component], "text_projection.weight", "the text projection",
                                "absent", "one (SD3.5 pools CLIP-L and CLIP-G through their projections)", arch)
        total = configs["text_encoder"]["projection_dim"] + configs["text_encoder_2"]["projection_dim"]
        if total != pooled:
            raise _mismatch(found["text_encoder_2"], "text_projection.weight",
                            "CLIP-L's and CLIP-G's projection widths together", total, pooled, arch)
        hidden = configs["text_encoder"]["hidden_size"] + configs["text_encoder_2"]["hidden_size"]
        if hidden > transformer["joint_attention_dim"]:
            raise _mismatch(found["text_encoder_2"], "text_model.embeddings.token_embedding.weight",
                            "CLIP-L's and CLIP-G's widths together", hidden,
                            f"at most {transformer['joint_attention_dim']} (the T5 width)", arch)
    latent = configs["vae"]["latent_channels"] * (4 if arch == "flux" else 1)
    if latent != transformer["in_channels"]:
        raise _mismatch(found["vae"], "decoder.conv_in.weight", "the VAE's latent channels" +
                        (" x 4 (Flux's 2x2 packing)" if arch == "flux" else ""), latent, transformer["in_channels"], arch)


def dit_auto_config(checkpoint: Path, shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str], arch: str,
                    folders: Mapping[str, Sequence[Path]], tokenizer_dirs: Sequence[Path] = ()):
    """The AutoConfig (bases.auto_config) of the ``arch`` transformer file ``checkpoint`` (its
    tensors' ``shapes``, its header ``metadata``): the transformer's config (recorded by our
    SaveCheckpoint, else derived from the shapes), each other part found by ``find_parts`` in
    ``folders`` with its config derived from the header of the file holding it and checked to fit,
    the scheduler of the family, and the tokenizers: CLIP from ``tokenizer_dirs``, T5 from
    ``folders["t5_tokenizer"]``, then the Hugging Face cache (offline)."""
    from .auto_config import CLIP_PAD, OPEN_CLIP_PAD, AutoConfig, find_tokenizer, recorded_configs
    from .dit_config import clip_config, dit_vae_config, t5_config, transformer_config
    from .presets import SCHEDULER_FLUX, SCHEDULER_SD3

    where = str(checkpoint)
    recorded = recorded_configs(metadata, arch, where) or {}
    transformer = recorded.get("transformer/config.json") or transformer_config(shapes, arch, where)
    found = find_parts(arch, checkpoint, shapes, folders)
    configs: dict[str, dict] = {}
    for part in PARTS[arch]:
        at = found[part.component]
        part_shapes = shapes if at.shapes is None else at.shapes
        if part.name == "t5xxl":
            configs[part.component] = t5_config(part_shapes, str(at.path))
        elif part.name == "vae":
            configs[part.component] = dit_vae_config(part_shapes, arch, str(at.path))
        else:
            configs[part.component] = clip_config(part_shapes, part.name, str(at.path))
    if arch == "flux":  # FluxPipeline pools CLIP-L's last hidden state: a projection in the file goes unused
        configs["text_encoder"]["architectures"] = ["CLIPTextModel"]
    _fit(arch, transformer, configs, found)
    if "scheduler/scheduler_config.json" in recorded:
        scheduler = recorded["scheduler/scheduler_config.json"]
    elif arch == "sd3":
        scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER_SD3}
    else:
        scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler",
                     **(SCHEDULER_FLUX if transformer.get("guidance_embeds") else SCHEDULER_SCHNELL)}
    index = {"_class_name": ARCHES[arch].pipeline_class, "scheduler": ["diffusers", scheduler["_class_name"]],
             "transformer": ["diffusers", transformer["_class_name"]]}
    files = {"transformer/config.json": transformer, "scheduler/scheduler_config.json": scheduler}
    tokenizers: dict[str, tuple[Path | None, str | None]] = {}
    for part in PARTS[arch]:
        config = configs[part.component]
        files[f"{part.component}/config.json"] = config
        library = "diffusers" if part.name == "vae" else "transformers"
        index[part.component] = [library, config.get("_class_name") or config["architectures"][0]]
        if part.name == "vae":
            continue
        tokenizer = part.component.replace("text_encoder", "tokenizer")
        index[tokenizer] = ["transformers", _TOKENIZER_CLASS[part.name]]
        if part.name == "t5xxl":
            tokenizers[tokenizer] = (find_tokenizer("t5", folders.get(T5_TOKENIZER, ()), where), None)
        else:
            tokenizers[tokenizer] = (find_tokenizer("clip", tokenizer_dirs, where),
                                     CLIP_PAD if part.name == "clip_l" else OPEN_CLIP_PAD)
    files["model_index.json"] = index
    return AutoConfig(arch, files, tokenizers, "metadata" if recorded else "shapes",
                      {component: (at.path, at.prefix) for component, at in found.items()})
