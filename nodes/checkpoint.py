"""SaveCheckpoint: write the model a recipe describes (LoRAs fused) as one original-layout file."""

from __future__ import annotations

from ..graph_runtime import Link, String, current_context, node
from .common import CATEGORY, MODEL, check_prefix, model_pool, output_ref, unique_output


# Not "CheckpointSave": that id is ComfyUI core's, and ComfyUI drops pack nodes whose id core has.
@node(category=f"{CATEGORY}/model", display_name="Save Single-File Checkpoint", output_node=True,
      inputs=[Link("model", MODEL), String("filename_prefix", "checkpoints/loraloom")], outputs=[])
class SaveCheckpoint:
    """The model with every LoRA of the recipe fused in, as one .safetensors checkpoint with the
    original key names (LDM for SD1.5, SGM for SDXL: what A1111, ComfyUI's checkpoint loader and
    diffusers' from_single_file read), under the output folder. Weights keep the model's dtype. To
    load it offline with LoadBase, give it a config: the diffusers folder of the same architecture
    (a SavePipeline folder will do)."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        return check_prefix(constants)

    def execute(self, model, filename_prefix):
        from ..bases.export import save_single_file

        target = unique_output(filename_prefix, ".safetensors")
        pipe = model_pool().pipeline_to_save(model, check_interrupt=current_context().check_interrupt)
        save_single_file(pipe, target)
        return {"ui": {"checkpoints": [output_ref(target)],
                       "text": [f"saved {model.describe()} to {target.name}"]}}
