"""LoadLoRA and SaveLoRA: LoRA files in and out of the graph."""

from __future__ import annotations

import dataclasses

from ..graph_runtime import Combo, Link, Output, String, node
from .common import CATEGORY, LORA, check_prefix, expand_prefix, folders, list_loras, new_output, output_ref

SAVE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
SAVE_PREFIX = "loras/loraloom"  # its folder says "a LoRA": inside ComfyUI, where the file goes is the loras folder
LORAS_FOLDER = SAVE_PREFIX.split("/")[0] + "/"


@node(id="LoraLoomLoadLoRA", aliases=("LoadLoRA",), category=f"{CATEGORY}/lora", display_name="Loom Load LoRA",
      inputs=[Combo("lora_name", list_loras, tooltip="a .safetensors LoRA in the LoRA folders (kohya, diffusers, "
                    "peft, LyCORIS LoHa/LoKr), or one saved into the output folder's loras/ ('... [output]')",
                    file_kind="loras")],
      outputs=[Output(LORA, "lora")])
class LoadLoRA:
    """Read a LoRA file (checked before use: header, shapes, dtypes, finite values) into a LoRA value."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        # Size and header limits at validation, before the runtime hashes the file for its cache key:
        # a 10 GB file is refused at once instead of after a minute of hashing.
        from ..graph_runtime import LoomError
        from ..lora.safefile import inspect_header

        name = constants.get("lora_name")
        try:
            path = folders().find("loras", name) if isinstance(name, str) else None
        except LoomError:
            return {}  # the list check names a missing file
        if path is None or path.is_dir():  # a peft folder: the reader checks its file
            return {}
        try:
            inspect_header(path)
        except LoomError as exc:
            return {"lora_name": str(exc)}
        return {}

    def execute(self, lora_name):
        from ..graph_runtime import current_context, known_fingerprint
        from ..lora.readers import read_lora

        ctx = current_context()
        path = folders().find("loras", lora_name)
        if path.is_dir():  # a peft folder: its files are hashed by the reader
            lora = read_lora(path)
        else:
            # The runtime hashed this file for its cache key a moment ago: its digest stands while the file
            # is in the state it was hashed in (strict mode trusts no remembered digest: hash what is read).
            known = None if ctx.strict_files else known_fingerprint(path)
            lora = read_lora(path, known_fingerprint=known)
            # The result belongs to the bytes read, whatever the file held when the key was computed.
            ctx.report_read(path, lora.fingerprint)
        return {"ui": {"text": [f"{lora_name}: {lora.describe()}"]}, "result": (lora,)}


def cast_lora(lora, dtype):
    """A copy of ``lora`` with every tensor in ``dtype`` (the input value is left untouched)."""
    import torch

    def cast_module(module):
        changes = {f.name: getattr(module, f.name).to(dtype) for f in dataclasses.fields(module)
                   if isinstance(getattr(module, f.name), torch.Tensor)}
        return dataclasses.replace(module, **changes)

    components = {c: {p: cast_module(m) for p, m in mods.items()} for c, mods in lora.components.items()}
    return lora.replace(components=components)


@node(id="LoraLoomSaveLoRA", aliases=("SaveLoRA",), category=f"{CATEGORY}/lora", display_name="Loom Save LoRA",
      output_node=True,
      inputs=[Link("lora", LORA), String("filename_prefix", SAVE_PREFIX),
              Combo("format", ["kohya", "diffusers"], "kohya", tooltip="kohya: what A1111 and ComfyUI load; "
                    "diffusers: what pipe.load_lora_weights loads"),
              Combo("dtype", list(SAVE_DTYPES), "fp16")],
      outputs=[])
class SaveLoRA:
    """Write a LoRA file atomically, with provenance in its metadata, where the LoRA loaders list it.
    Headless: under the output folder; saved under ``loras/`` (the default prefix), LoadLoRA offers
    it as ``loras/<name> [output]``. Inside ComfyUI: in ComfyUI's first loras folder, so that its
    LoraLoader and our LoadLoRA list it by its plain name in the next run; the prefix names the file
    there, a leading ``loras/`` (the default, which says where it goes) dropped."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        return check_prefix(constants)

    def execute(self, lora, filename_prefix, format, dtype):
        import torch

        from ..lora.writers import write_diffusers, write_kohya

        out = cast_lora(lora, getattr(torch, SAVE_DTYPES[dtype]))
        provenance = {"source_fingerprint": lora.fingerprint, "source_format": lora.source_format,
                      "saved_dtype": dtype}
        if lora.source_format == "derived":  # a merge made in this graph: keep how it was made
            provenance.update({k.removeprefix("loraloom."): v for k, v in lora.metadata.items()
                               if k.startswith("loraloom.")})
        write = write_kohya if format == "kohya" else write_diffusers
        prefix, root = expand_prefix(filename_prefix), folders().lora_save_dir
        if root is not None:
            prefix = prefix.removeprefix(LORAS_FOLDER)
        with new_output(prefix, ".safetensors", root=root) as new:
            write(out, new.stage, provenance=provenance)
        described = f"({format}, {dtype}): {out.describe()}"
        if root is not None:  # not in the output folder, so no /view reference: the name the loaders list
            return {"ui": {"text": [f"saved {folders().lora_name(new.path.resolve())} {described}"]}}
        ref = output_ref(new.path)
        return {"ui": {"loras": [ref], "text": [f"saved {ref['subfolder']}/{ref['filename']} {described}"]}}
