"""LoadBase: a base model from a built-in preset, a diffusers folder or a single-file checkpoint."""

from __future__ import annotations

from ..graph_runtime import Combo, InputError, Output, file_fingerprint, node
from .common import (CATEGORY, CHECKPOINT_SUFFIXES, MODEL, find_base, folders, list_bases, list_config_folders,
                     model_pool, part_dirs, tokenizer_dirs)


def _auto(path, f=None):
    """The bases.auto_config.AutoConfig: what config "auto" finds for the checkpoint at ``path`` where
    this runtime (``f``: its Folders, default the running context's) looks (header reads only)."""
    from ..bases.arch import detect_checkpoint_arch
    from ..bases.auto_config import auto_config
    from ..bases.checks import weights_header

    header = weights_header(path)
    arch = detect_checkpoint_arch(header.tensors, str(path))
    return auto_config({k: info.shape for k, info in header.tensors.items()}, header.metadata, arch, str(path),
                       tokenizer_dirs(f), part_dirs(f))


def _base_fingerprint(inputs: dict, f) -> str | None:
    """Content fingerprint of a file or folder source, or of a trained preset's weights file (the
    random presets are versioned by name); with config "auto", of every other file it builds the
    pipeline from too (a Flux / SD3.5 file's text encoders and VAE, the tokenizers)."""
    from ..bases.presets import PRESETS
    from ..graph_runtime import LoomError

    parts = []
    source = inputs.get("source")
    if isinstance(source, str) and source in PRESETS:
        if PRESETS[source].weights:
            parts.append(PRESETS[source].fingerprint)
    elif isinstance(source, str):
        path = find_base(source, f)
        parts.append(file_fingerprint(path))
        if inputs.get("config") == "auto" and path.is_file():
            try:
                parts.append(_auto(path, f).files_fingerprint(path))
            except LoomError:
                pass  # refused: execute says why, with the same error
    config = inputs.get("config")
    if isinstance(config, str) and config != "auto":
        parts.append(file_fingerprint(f.find("models", config)))
    return "|".join(parts) or None


@node(id="LoraLoomLoadBase", aliases=("LoadBase",), category=f"{CATEGORY}/model", display_name="Loom Load Base Model",
      inputs=[Combo("source", list_bases, "tiny-sdxl", tooltip="a built-in preset, a diffusers folder or a "
                    ".safetensors checkpoint (inside ComfyUI: those its checkpoint loader lists)"),
              Combo("config", list_config_folders, "auto", tooltip="single-file checkpoints only. auto: every "
                    "config from the files themselves, offline (a Flux / SD3.5 transformer's text encoders and VAE "
                    "from the file or, by their usual names, from the text_encoders and vae folders); or the "
                    "diffusers folder (or config skeleton) whose configs and tokenizers to use; for a Flux / SD3.5 "
                    "transformer file, a diffusers folder that brings the text encoders and VAE"),
              Combo("dtype", ["auto", "fp32", "fp16", "bf16"], "auto", tooltip="auto: fp16 on a GPU, fp32 on CPU"),
              Combo("device", ["auto", "cpu", "cuda"], "auto")],
      outputs=[Output(MODEL, "model")], fingerprint=_base_fingerprint)
class LoadBase:
    """Load a base model (SD1.5, SDXL, Flux or SD3.5). The live pipeline stays in the model pool;
    the wire carries a recipe of the plain base."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        from ..bases.presets import PRESETS

        # An input that is absent (linked, or refused by its own check) is unknown: nothing is said about it.
        source, config = constants.get("source"), constants.get("config")
        if source in PRESETS and config not in (None, "auto"):
            return {"config": InputError(f"{config!r} given, but preset {source!r} needs no config; set it to 'auto'",
                                         value=config, limit="auto", kind="config_not_needed")}
        if isinstance(source, str) and source.lower().endswith(CHECKPOINT_SUFFIXES) and config == "auto":
            return cls._check_auto(source)
        return {}

    @staticmethod
    def _check_auto(source: str) -> dict:
        """Whether config "auto" will work for this checkpoint: its configs derivable from its header
        and its tokenizer found (small reads, no torch). A missing file is the list check's to name."""
        from ..graph_runtime import LoomError

        try:
            path = find_base(source)
        except LoomError:
            return {}
        try:
            _auto(path)
        except LoomError as exc:
            # the checkpoint is named by its listed name; another file (a Flux / SD3.5 part) and the
            # key keep their place in the text
            where = exc.where().removeprefix(f"{path}: ")
            return {"config": InputError(f"{source}: {where}{exc.message}", value="auto", limit=exc.limit,
                                         kind=exc.kind or "config_needed", fix=exc.fix)}
        return {}

    @classmethod
    def output_facts(cls, constants: dict, upstream: dict) -> dict | None:
        """What validation knows of the model before loading it: its architecture, from the preset, the
        diffusers folder's model_index.json and denoiser config, or the checkpoint's header (small
        reads, no torch)."""
        from ..bases.arch import detect_file_arch, detect_folder_arch
        from ..bases.presets import PRESETS

        source = constants.get("source")
        if not isinstance(source, str):
            return None
        if source in PRESETS:
            return {"arch": PRESETS[source].arch}
        path = find_base(source)
        return {"arch": detect_file_arch(path) if path.is_file() else detect_folder_arch(path)}

    def execute(self, source, config, dtype, device):
        from ..bases.pool import ModelRecipe
        from ..bases.presets import PRESETS

        f = folders()
        path = source if source in PRESETS else str(find_base(source))
        config_path = None if config == "auto" else str(f.find("models", config))
        auto = config_path is None and source not in PRESETS
        handle = model_pool().load(path, dtype=dtype, device=device, config=config_path,
                                   tokenizer_dirs=tokenizer_dirs() if auto else (), part_dirs=part_dirs() if auto else None)
        return (ModelRecipe(handle),)
