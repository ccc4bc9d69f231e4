"""config="auto" for single-file SD1.5 / SDXL checkpoints: the diffusers configs a checkpoint needs,
found offline in its own header, and its tokenizers found on this machine.

A single file holds weights only; diffusers' ``from_single_file`` takes the configs (and tokenizers)
from the Hugging Face hub unless it is given a local folder. Here that folder is written from the
file itself:

- a file our SaveCheckpoint wrote carries the exact configs of the pipeline it came from in its
  metadata (``CONFIGS_KEY``), so our own files load back bit-exactly;
- any other file gets configs derived from its tensors' shapes and key names (levels, channels,
  layers, attention levels, projections), with the values of its family where shapes cannot tell:
  attention heads (SD1.5: 8 per block; SDXL and the CLIP encoders: heads of 64 channels), GroupNorm
  groups (32), activations (CLIP-L quick_gelu, OpenCLIP bigG gelu), default sizes, scaling factors,
  and the token ids of the published text-encoder configs.

Tokenizers: the tiny presets' built-in one where the file says it was written with it
(``TOKENIZERS_KEY``); otherwise the CLIP tokenizer files (vocab.json + merges.txt, or
tokenizer.json) from, in order, the folders the caller names (LoadBase: ``<models>/tokenizers/clip``,
then ComfyUI's own ``comfy/sd1_tokenizer`` when running inside ComfyUI), then the Hugging Face cache
(offline, no download). Nothing here imports torch: validation runs it when a prompt is queued.

Flux and SD3.5 files hold the transformer alone (or, all-in-one, some of the other parts too):
``bases.dit_parts`` finds the text encoders and VAE in the file or by name in ComfyUI-style folders
and derives every config from the headers (``bases.dit_config``).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..lora.arches import ARCHES
from .arch import OPEN_CLIP_PREFIX, TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, BaseModelError

CONFIGS_KEY = "loraloom.configs"
"""Metadata key of a single file we wrote: JSON {relative path in a config folder: that JSON file}."""
TOKENIZERS_KEY = "loraloom.tokenizers"
"""Metadata key: JSON {tokenizer component: its pad token} when the file's pipeline used the tiny
presets' built-in tokenizer (its vocabulary is in no file)."""
WRITER = "loraloom-single-file"  # the "writer" metadata bases.export puts on every single file
TOKENIZER_FOLDER = "tokenizers/clip"
"""Where LoadBase looks first for the CLIP tokenizer files, under the models folder."""
T5_TOKENIZER_FOLDER = "tokenizers/t5"
"""Where LoadBase is to look first for the T5 tokenizer files (Flux, SD3.5), under the models folder."""
# The Hugging Face cache entries (repo, subfolder) that hold the CLIP tokenizer of SD1.5 / SDXL.
HF_TOKENIZERS = (("openai/clip-vit-large-patch14", ""),
                 ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
                 ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"))

# Family values that no shape tells (the published diffusers configs of SD1.5 and SDXL base 1.0).
FAMILY = {
    "sd15": {"pipeline": "StableDiffusionPipeline", "unet_sample_size": 64, "vae_sample_size": 512,
             "scaling_factor": 0.18215, "force_upcast": None, "unet": {}},
    "sdxl": {"pipeline": "StableDiffusionXLPipeline", "unet_sample_size": 128, "vae_sample_size": 1024,
             "scaling_factor": 0.13025, "force_upcast": True, "unet": {"upcast_attention": None}},
}
SD15_HEADS = 8  # SD1.5's UNet: 8 attention heads in every block (diffusers calls it attention_head_dim)
HEAD_WIDTH = 64  # SDXL's UNet and the CLIP-L / OpenCLIP bigG encoders: heads of 64 channels
NORM_GROUPS = 32  # GroupNorm groups of SD's UNet and VAE
# The published text-encoder configs keep OpenAI CLIP's original token ids (0, 1, 2): transformers
# then pools at the highest id of each prompt, which is the end token 49407.
CLIP_TOKEN_IDS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
# SD's training schedule, with Euler (SDXL's shipped scheduler; Sample picks its own anyway).
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
             "timestep_spacing": "leading", "steps_offset": 1}
CLIP_PAD = "<|endoftext|>"  # CLIP-L's tokenizer pads with its end token
OPEN_CLIP_PAD = "!"  # OpenCLIP bigG's (SDXL's and SD3.5's second tokenizer) pads with "!" (id 0), as trained
_FIX_CONFIG = "choose a config folder: the diffusers folder of the same model (or a SavePipeline folder)"


@dataclass(frozen=True)
class AutoConfig:
    """What config="auto" found for one checkpoint.

    files: the config folder's JSON files by relative path ("model_index.json", "unet/config.json" ...).
    tokenizers: tokenizer component -> (folder of its files, or None for the built-in one; pad token,
        or None for the tokenizer's own).
    source: "metadata" (the file's own exact configs) or "shapes" (derived).
    parts: for a Flux / SD3.5 transformer file, pipeline component -> (the file holding its weights,
        the prefix of its keys there): the text encoders and the VAE (see bases.dit_parts).
    """

    arch: str
    files: dict[str, dict[str, Any]]
    tokenizers: dict[str, tuple[Path | None, str | None]]
    source: str
    parts: dict[str, tuple[Path, str]] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Content hash of the configs and the tokenizers' identity (their files' names and sizes are
        enough here: the caller hashes the folders it found with file_fingerprint)."""
        body = json.dumps({"files": self.files, "tokenizers": {k: [str(p) if p else None, pad] for k, (p, pad)
                                                               in sorted(self.tokenizers.items())},
                           "parts": {k: [str(p), prefix] for k, (p, prefix) in sorted(self.parts.items())}},
                          sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def part_files(self, checkpoint: Path) -> list[Path]:
        """The files holding parts of the pipeline besides ``checkpoint`` itself, each once."""
        return sorted({Path(file) for file, _ in self.parts.values()} - {Path(checkpoint)})

    def files_fingerprint(self, checkpoint: Path) -> str:
        """The content of every other file the pipeline is built from (parts, tokenizers), for the
        base's fingerprint: a changed encoder or tokenizer file makes it a different base."""
        from ..graph_runtime import file_fingerprint

        text = "".join(f"+part:sha256:{file_fingerprint(file)}" for file in self.part_files(checkpoint))
        return text + "+tokenizers:" + ",".join(
            f"{pad}:" + ("builtin" if folder is None else "|".join(file_fingerprint(f) for f in tokenizer_files(folder)))
            for _, (folder, pad) in sorted(self.tokenizers.items()))

    def write(self, folder: Path) -> None:
        """Write the config files into ``folder`` (which exists and is empty)."""
        for rel, config in self.files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(config, indent=2, sort_keys=True))


def auto_config(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str], arch: str, where: str,
                tokenizer_dirs: Sequence[Path] = (), part_dirs: Mapping[str, Sequence[Path]] | None = None
                ) -> AutoConfig:
    """The configs and tokenizers of the ``arch`` single file ``where`` (its tensors' ``shapes`` by key,
    its header ``metadata``); ``tokenizer_dirs``: folders searched for the CLIP tokenizer before the
    Hugging Face cache. For a Flux / SD3.5 transformer file, ``part_dirs`` (folder kind ->
    folders: "text_encoders", "vae", "t5_tokenizer") is where its other parts are looked for (see
    bases.dit_parts). Raises BaseModelError saying what is missing, with the Fix."""
    if ARCHES[arch].denoiser == "transformer":
        from .dit_parts import dit_auto_config

        return dit_auto_config(Path(where), shapes, metadata, arch, part_dirs or {}, tokenizer_dirs)
    files, source = recorded_configs(metadata, arch, where), "metadata"
    if files is None:
        files, source = derive_configs(shapes, arch, where), "shapes"
    tokenizers = _builtin_tokenizers(metadata, arch)
    if tokenizers is None:
        folder = find_clip_tokenizer(tokenizer_dirs, where)
        tokenizers = {"tokenizer": (folder, CLIP_PAD)}
        if arch == "sdxl":
            tokenizers["tokenizer_2"] = (folder, OPEN_CLIP_PAD)
    return AutoConfig(arch, files, tokenizers, source)


def recorded_configs(metadata: Mapping[str, str], arch: str, where: str) -> dict[str, dict] | None:
    """The exact configs our SaveCheckpoint recorded, or None (another writer, or none recorded).
    What they say is checked like any config folder's before a model is built from them."""
    if metadata.get("writer") != WRITER or CONFIGS_KEY not in metadata:
        return None
    from ..graph_runtime.jsonio import loads_strict

    try:
        files = loads_strict(metadata[CONFIGS_KEY].encode(), source=f"{where} metadata {CONFIGS_KEY}")
    except Exception as exc:  # a damaged record: say so rather than guess
        raise BaseModelError(f"its {CONFIGS_KEY} metadata is not valid JSON: {str(exc)[:200]}", file=where,
                             key=CONFIGS_KEY, kind="bad_metadata", fix=_FIX_CONFIG) from None
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and re.fullmatch(r"(\w+/)?\w+\.json", k) for k, v in files.items()):
        raise BaseModelError(f"its {CONFIGS_KEY} metadata is not a map of config files to JSON objects.", file=where,
                             key=CONFIGS_KEY, kind="bad_metadata", fix=_FIX_CONFIG)
    pipeline = files.get("model_index.json", {}).get("_class_name")
    if pipeline != ARCHES[arch].pipeline_class:
        raise BaseModelError(f"its {CONFIGS_KEY} metadata describes a {pipeline!r} pipeline, but the weights are "
                             f"{arch}.", file=where, key=CONFIGS_KEY, value=pipeline, limit=ARCHES[arch].pipeline_class,
                             kind="config_mismatch", fix=_FIX_CONFIG)
    return files


def _builtin_tokenizers(metadata: Mapping[str, str], arch: str) -> dict[str, tuple[None, str]] | None:
    if metadata.get("writer") != WRITER or TOKENIZERS_KEY not in metadata:
        return None
    try:
        pads = json.loads(metadata[TOKENIZERS_KEY])
    except ValueError:
        return None
    wanted = ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",)
    if not isinstance(pads, dict) or sorted(pads) != sorted(wanted) or not all(isinstance(v, str) for v in pads.values()):
        return None
    return {name: (None, pads[name]) for name in wanted}


# ------------------------------------------------------------------------------ from shapes


class HeaderShapes:
    """The tensors' shapes under one prefix, with errors that name the file and the missing key
    (``family``: what a complete file is, said in that error; ``fix``: its Fix)."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], prefix: str, where: str, what: str,
                 family: str = "SD1.5 / SDXL checkpoint", fix: str = _FIX_CONFIG):
        self.shapes, self.prefix, self.where, self.what = shapes, prefix, where, what
        self.family, self.fix = family, fix

    def __call__(self, key: str) -> tuple[int, ...]:
        full = self.prefix + key
        if full not in self.shapes:
            raise BaseModelError(f"the {self.what} lacks {full!r}, so its config cannot be derived "
                                 f"(not a complete {self.family}?).", file=self.where, key=full,
                                 kind="config_underivable", fix=self.fix)
        return tuple(int(n) for n in self.shapes[full])

    def has(self, key: str) -> bool:
        return self.prefix + key in self.shapes

    def indices(self, pattern: str) -> list[int]:
        """The distinct N of keys matching ``pattern`` (a regex with one (\\d+) group, after the prefix)."""
        rx = re.compile(re.escape(self.prefix) + pattern)
        return sorted({int(m.group(1)) for key in self.shapes if (m := rx.match(key))})


def _divisible(value: int, by: int, what: str, where: str) -> int:
    if value % by:
        raise BaseModelError(
            f"{what} is {value}, not a multiple of {by}, the value the published models use where shapes "
            "cannot tell: this model is not of the standard family, so its config cannot be derived.", file=where,
            value=value, limit=f"a multiple of {by}", kind="config_underivable", fix=_FIX_CONFIG)
    return value // by


def _unet_config(s: HeaderShapes, arch: str, where: str) -> dict[str, Any]:
    conv_in = s("input_blocks.0.0.weight")
    levels, channels, attention, depth, layers = [], [], [], [], None
    block = 1
    for level in range(16):
        resnets = 0
        while s.has(f"input_blocks.{block}.0.in_layers.2.weight"):
            if resnets == 0:
                channels.append(s(f"input_blocks.{block}.0.out_layers.3.weight")[0])
                attention.append(s.has(f"input_blocks.{block}.1.proj_in.weight"))
                depth.append(len(s.indices(rf"input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\.")) or 1)
            resnets, block = resnets + 1, block + 1
        if resnets == 0:
            break
        if layers not in (None, resnets):
            raise BaseModelError(f"UNet level {level} has {resnets} resnets, level 0 has {layers}.",
                                 file=where, value=resnets, limit=layers, kind="config_underivable", fix=_FIX_CONFIG)
        layers = resnets
        levels.append(level)
        if not s.has(f"input_blocks.{block}.0.op.weight"):
            break
        block += 1
    if not levels:
        s("input_blocks.1.0.in_layers.2.weight")  # raises: names the key a UNet must have
    proj_in = s(f"input_blocks.{1 + attention.index(True) * (layers + 1)}.1.proj_in.weight") if any(attention) \
        else s("middle_block.1.proj_in.weight")
    cross_key = next((k for k in s.shapes if k.startswith(s.prefix) and k.endswith(".attn2.to_k.weight")),
                     s.prefix + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": FAMILY[arch]["unet_sample_size"],
        "in_channels": conv_in[1],
        "out_channels": s("out.2.weight")[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": s(cross_key.removeprefix(s.prefix))[1],
        "norm_num_groups": NORM_GROUPS,
        "use_linear_projection": len(proj_in) == 2,
        **FAMILY[arch]["unet"],
    }
    for c in channels:
        _divisible(c, NORM_GROUPS, "a UNet block's channel count", where)
    if s("time_embed.0.weight")[0] != 4 * channels[0]:
        config["time_embedding_dim"] = s("time_embed.0.weight")[0]
    if arch == "sd15":
        config["attention_head_dim"] = SD15_HEADS
        for c in channels:
            _divisible(c, SD15_HEADS, "a UNet block's channel count", where)
    else:
        config["attention_head_dim"] = [_divisible(c, HEAD_WIDTH, "a UNet block's channel count", where)
                                        for c in channels]
        config["transformer_layers_per_block"] = [d if a else 1 for d, a in zip(depth, attention)]
        time_dim, added = s("label_emb.0.0.weight")
        pooled = tuple(s.shapes[OPEN_CLIP_PREFIX + "text_projection"])[1] \
            if OPEN_CLIP_PREFIX + "text_projection" in s.shapes else None
        if pooled is None:
            raise BaseModelError(f"no {OPEN_CLIP_PREFIX}text_projection, the pooled projection SDXL's "
                                 "UNet is conditioned on.", file=where, key=OPEN_CLIP_PREFIX + "text_projection",
                                 kind="config_underivable", fix=_FIX_CONFIG)
        config.update({"addition_embed_type": "text_time",
                       "addition_time_embed_dim": _divisible(added - pooled, 6, "the micro-conditioning width", where),
                       "projection_class_embeddings_input_dim": added})
    return config


def vae_config(s: HeaderShapes, family: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An AutoencoderKL config from its LDM-named tensors (``s``) and the ``family`` values no shape
    tells (a ``FAMILY`` entry, or the DiT bases' in bases.dit_config; "shift_factor" where it has one)."""
    levels = s.indices(r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    channels = [s(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels]
    for c in channels:
        _divisible(c, NORM_GROUPS, "a VAE block's channel count", where)
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": s("encoder.conv_in.weight")[1],
        "out_channels": s("decoder.conv_out.weight")[0],
        "latent_channels": s("decoder.conv_in.weight")[1],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": len(s.indices(r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")),
        "norm_num_groups": NORM_GROUPS,
        "sample_size": family["vae_sample_size"],
        "scaling_factor": family["scaling_factor"],
        "use_quant_conv": s.has("quant_conv.weight"),
        "use_post_quant_conv": s.has("post_quant_conv.weight"),
        "mid_block_add_attention": s.has("encoder.mid.attn_1.q.weight"),
    }
    if family["force_upcast"] is not None:
        config["force_upcast"] = family["force_upcast"]
    if "shift_factor" in family:
        config["shift_factor"] = family["shift_factor"]
    return config


def clip_text_config(s: HeaderShapes, where: str) -> dict[str, Any]:
    """CLIP-L in the HF layout (SD1.5's encoder, SDXL's first; ``s`` reads under ``text_model.``)."""
    vocab, hidden = s("embeddings.token_embedding.weight")
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": s("encoder.layers.0.mlp.fc1.weight")[0],
            "num_hidden_layers": len(s.indices(r"encoder\.layers\.(\d+)\.mlp\.fc1\.weight")),
            "num_attention_heads": _divisible(hidden, HEAD_WIDTH, "the text encoder's width", where),
            "max_position_embeddings": s("embeddings.position_embedding.weight")[0],
            "hidden_act": "quick_gelu", "projection_dim": hidden, **CLIP_TOKEN_IDS}


def _open_clip_config(s: HeaderShapes, where: str) -> dict[str, Any]:
    """OpenCLIP bigG (SDXL's second encoder); its projection is stored transposed."""
    vocab, hidden = s("token_embedding.weight")
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": s("transformer.resblocks.0.mlp.c_fc.weight")[0],
            "num_hidden_layers": len(s.indices(r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.weight")),
            "num_attention_heads": _divisible(hidden, HEAD_WIDTH, "the second text encoder's width", where),
            "max_position_embeddings": s("positional_embedding")[0], "hidden_act": "gelu",
            "projection_dim": s("text_projection")[1], **CLIP_TOKEN_IDS}


def derive_configs(shapes: Mapping[str, Sequence[int]], arch: str, where: str) -> dict[str, dict[str, Any]]:
    """The config folder's files of an SD1.5 / SDXL single file, from its tensors' shapes (key -> shape,
    original LDM / SGM names) and the family values of ``FAMILY`` and the constants above."""
    text = TEXT_PREFIXES[(arch, "text_encoder")]
    files = {
        "unet/config.json": _unet_config(HeaderShapes(shapes, UNET_PREFIX, where, "UNet"), arch, where),
        "vae/config.json": vae_config(HeaderShapes(shapes, VAE_PREFIX, where, "VAE"), FAMILY[arch], where),
        "text_encoder/config.json": clip_text_config(HeaderShapes(shapes, text, where, "text encoder"), where),
        "scheduler/scheduler_config.json": dict(SCHEDULER),
    }
    index = {"_class_name": FAMILY[arch]["pipeline"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", SCHEDULER["_class_name"]]}
    if arch == "sdxl":
        files["text_encoder_2/config.json"] = _open_clip_config(HeaderShapes(shapes, OPEN_CLIP_PREFIX, where,
                                                                        "second text encoder"), where)
        index.update({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True})
    else:
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                      "requires_safety_checker": False})
    files["model_index.json"] = index
    return files


# -------------------------------------------------------------------------------- tokenizers


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model", "tokenizer_config.json",
                   "special_tokens_map.json")


@dataclass(frozen=True)
class TokenizerKind:
    """Where config "auto" finds one kind of tokenizer: ``file_sets`` (any one complete set makes a
    folder a tokenizer folder), the Hugging Face cache entries (repo, subfolder) holding it, the
    folder under the models folder looked at first, and the Fix when it is found nowhere."""

    label: str
    file_sets: tuple[tuple[str, ...], ...]
    hf: tuple[tuple[str, str], ...]
    fix: str

    def holds(self, folder: Path) -> bool:
        """Whether ``folder`` holds one complete set of this tokenizer's files."""
        return any(all((folder / name).is_file() for name in names) for names in self.file_sets)

    def describe(self) -> str:
        return ", or ".join(" + ".join(names) for names in self.file_sets)


TOKENIZER_KINDS = {
    "clip": TokenizerKind(
        "CLIP", (("vocab.json", "merges.txt"), ("tokenizer.json",)), HF_TOKENIZERS,
        f"put the files of openai/clip-vit-large-patch14's tokenizer into <models>/{TOKENIZER_FOLDER}/ "
        "(inside ComfyUI, its own comfy/sd1_tokenizer is used), or choose a config folder"),
    # Flux's tokenizer_2 and SD3.5's tokenizer_3 are google/t5-v1_1-xxl's (ComfyUI ships its
    # tokenizer.json as comfy/text_encoders/t5_tokenizer)
    "t5": TokenizerKind(
        "T5", (("tokenizer.json",), ("spiece.model",)),
        (("google/t5-v1_1-xxl", ""), ("black-forest-labs/FLUX.1-dev", "tokenizer_2"),
         ("stabilityai/stable-diffusion-3.5-large", "tokenizer_3")),
        f"put the files of google/t5-v1_1-xxl's tokenizer into <models>/{T5_TOKENIZER_FOLDER}/ "
        "(inside ComfyUI, its own comfy/text_encoders/t5_tokenizer is used), or choose a config folder"),
}


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files of ``folder`` (what the tokenizer reads: a base's fingerprint hashes these,
    never the rest of a folder such as a Hugging Face snapshot with model weights)."""
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def hf_cache_tokenizers(kind: str = "clip") -> list[Path]:
    """The tokenizer folders of ``kind`` ("clip" or "t5") the Hugging Face cache holds (looked up
    offline, never downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    tokenizer, found = TOKENIZER_KINDS[kind], []
    for repo, sub in tokenizer.hf:
        for names in tokenizer.file_sets:
            hit = try_to_load_from_cache(repo, f"{sub}/{names[0]}" if sub else names[0])
            if isinstance(hit, str) and tokenizer.holds(Path(hit).parent):
                found.append(Path(hit).parent)
                break
    return found


def find_tokenizer(kind: str, tokenizer_dirs: Sequence[Path], where: str) -> Path:
    """The first folder of ``tokenizer_dirs``, then of the Hugging Face cache, holding the files of a
    ``kind`` ("clip" or "t5") tokenizer; else an error listing every place looked at."""
    tokenizer = TOKENIZER_KINDS[kind]
    searched = [Path(d) for d in tokenizer_dirs]
    for folder in searched:
        if tokenizer.holds(folder):
            return folder
    cached = hf_cache_tokenizers(kind)
    if cached:
        return cached[0]
    places = ", ".join(str(p) for p in searched) or "no folder"
    repos = ", ".join(repo for repo, _ in tokenizer.hf)
    raise BaseModelError(
        f"config 'auto' needs the {tokenizer.label} tokenizer ({tokenizer.describe()}) and found it "
        f"nowhere: looked in {places}, then the Hugging Face cache ({repos}).", file=where, value="auto",
        limit=places, kind="tokenizer_missing", fix=tokenizer.fix)


def find_clip_tokenizer(tokenizer_dirs: Sequence[Path], where: str) -> Path:
    """The CLIP tokenizer's folder (``find_tokenizer("clip", ...)``): SD1.5's and SDXL's."""
    return find_tokenizer("clip", tokenizer_dirs, where)
