"""Where the other parts of a Flux / SD3.5 pipeline are, for config="auto" on a transformer file:
the text encoders and the VAE, found offline the way ComfyUI users keep them.

Each part is looked for, in order, inside the checkpoint itself (all-in-one files keep them under
``text_encoders.<name>.transformer.`` and ``first_stage_model.``), then by its usual file name in the
folders the caller gives per ComfyUI folder kind (``text_encoders``: ComfyUI's models/text_encoders and
models/clip; ``vae``: models/vae; extra_model_paths.yaml included where ComfyUI runs). A file found by
name must hold the part's marker key (read from its header only), so a wrong file is named, never
loaded. Everything missing is reported at once, with every place looked at. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .arch import BaseModelError


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
_T5 = ("t5xxl", "text_encoders", ("t5xxl_fp16.safetensors", "t5xxl_fp32.safetensors"), "text_encoders.t5xxl.transformer.",
       "shared.weight")
_VAE = ("first_stage_model.", "decoder.conv_in.weight")
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
    """Where one part's weights are: the file and the prefix of its keys there ("" for its own file)."""

    path: Path
    prefix: str


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
        if part.marker not in weights_header(path).tensors:
            raise BaseModelError(f"is not a {part.name} file: it lacks {part.marker!r}, which every {part.name} "
                                 "file holds.", file=path, key=part.marker, value=part.name, kind="part_mismatch",
                                 fix=f"put the {part.name} file of the {arch} model there under this name")
        found[part.component] = Found(path, "")
    if missing:
        raise BaseModelError(
            f"holds the {arch} transformer; config 'auto' needs the other parts of the pipeline too and did "
            f"not find: {'; '.join(f'{name} ({where})' for name, where in missing.items())}.", file=checkpoint,
            value=list(missing),
            kind="parts_missing", fix=_FIX)
    return found
