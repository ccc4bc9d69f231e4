"""SavePipeline: write the model a recipe describes (LoRAs fused) as a diffusers folder."""

from __future__ import annotations

from ..graph_runtime import Link, String, current_context, node
from .common import CATEGORY, MODEL, check_prefix, expand_prefix, model_pool, new_output, output_ref


@node(id="LoraLoomSavePipeline", aliases=("SavePipeline",), category=f"{CATEGORY}/model",
      display_name="Loom Save Pipeline", output_node=True,
      inputs=[Link("model", MODEL), String("filename_prefix", "pipelines/loraloom")], outputs=[])
class SavePipeline:
    """save_pretrained of the model with every LoRA of the recipe fused in, as a new folder under the
    output folder (written to a temp folder first, then renamed: never half a folder)."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        return check_prefix(constants)

    def execute(self, model, filename_prefix):
        from ..bases.export import save_diffusers_folder

        return save_fused(model, filename_prefix, save_diffusers_folder, "pipelines", folder=True)


def save_fused(model, filename_prefix: str, write, ui_key: str, suffix: str = "", folder: bool = False) -> dict:
    """Write the model ``model`` describes, every LoRA fused, with ``write(pipe, path)`` under a new
    numbered output name; returns the node's UI output (``ui_key``: the list of saved references)."""
    prefix = expand_prefix(filename_prefix)
    # the base as it should be saved, whatever ran on the pool before (schedulers, tokenizers)
    pipe = model_pool().pipeline_to_save(model, check_interrupt=current_context().check_interrupt)
    with new_output(prefix, suffix, folder=folder) as new:
        write(pipe, new.stage)
    return {"ui": {ui_key: [output_ref(new.path)], "text": [f"saved {model.describe()} to {new.path.name}"]}}
