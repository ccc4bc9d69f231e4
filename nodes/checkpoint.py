"""SaveCheckpoint: write the model a recipe describes (LoRAs fused) as one original-layout file."""

from __future__ import annotations

from ..graph_runtime import Link, String, node
from .common import CATEGORY, MODEL, check_prefix
from .pipeline import save_fused


# Not "CheckpointSave": that id is ComfyUI core's, and ComfyUI drops pack nodes whose id core has.
@node(id="LoraLoomSaveCheckpoint", aliases=("SaveCheckpoint",), category=f"{CATEGORY}/model",
      display_name="Loom Save Single-File Checkpoint", output_node=True,
      inputs=[Link("model", MODEL), String("filename_prefix", "checkpoints/loraloom")], outputs=[])
class SaveCheckpoint:
    """The model with every LoRA of the recipe fused in, as one .safetensors checkpoint with the
    original key names (LDM for SD1.5, SGM for SDXL: what A1111, ComfyUI's checkpoint loader and
    diffusers' from_single_file read; for Flux and SD3.5 the transformer alone with Black Forest
    Labs' / Stability's names, as flux1-dev.safetensors ships and ComfyUI's diffusion-model loader
    reads), under the output folder. Weights keep the model's dtype. An SD1.5 / SDXL file records
    its configs, so LoadBase loads it back exactly with config auto. A Flux / SD3.5 file records its
    transformer's: with config auto LoadBase takes the text encoders and VAE from their own files
    (the text_encoders and vae folders), or give it a config: the diffusers folder of the same
    architecture (a SavePipeline folder will do)."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        return check_prefix(constants)

    def execute(self, model, filename_prefix):
        from ..bases.export import save_single_file

        return save_fused(model, filename_prefix, save_single_file, "checkpoints", suffix=".safetensors")
