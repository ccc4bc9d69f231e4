"""SavePipeline: write the model a recipe describes (LoRAs fused) as a diffusers folder."""

from __future__ import annotations

from ..graph_runtime import Link, String, current_context, node
from .common import CATEGORY, MODEL, check_prefix, expand_prefix, model_pool, new_output, output_ref


@node(category=f"{CATEGORY}/model", display_name="Save Pipeline", output_node=True,
      inputs=[Link("model", MODEL), String("filename_prefix", "pipelines/loraloom")], outputs=[])
class SavePipeline:
    """save_pretrained of the model with every LoRA of the recipe fused in, as a new folder under the
    output folder (written to a temp folder first, then renamed: never half a folder)."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        return check_prefix(constants)

    def execute(self, model, filename_prefix):
        from ..bases.export import save_diffusers_folder

        prefix = expand_prefix(filename_prefix)
        # the base as it should be saved, whatever ran on the pool before (schedulers, tokenizers)
        pipe = model_pool().pipeline_to_save(model, check_interrupt=current_context().check_interrupt)
        with new_output(prefix, folder=True) as new:
            save_diffusers_folder(pipe, new.stage)
        return {"ui": {"pipelines": [output_ref(new.path)], "text": [f"saved {model.describe()} to {new.path.name}"]}}
