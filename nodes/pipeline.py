"""SavePipeline: write the model a recipe describes (LoRAs fused) as a diffusers folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..graph_runtime.context import current_context
from ..graph_runtime.schema import Link, String, node
from .common import CATEGORY, MODEL, check_prefix, folders, model_pool, output_ref


@node(category=f"{CATEGORY}/model", display_name="Save Pipeline", output_node=True,
      inputs=[Link("model", MODEL), String("filename_prefix", "pipelines/loraloom")], outputs=[])
class SavePipeline:
    """save_pretrained of the model with every LoRA of the recipe fused in, as a new folder under the
    output folder (written to a temp folder first, then renamed: never half a folder)."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        return check_prefix(constants)

    def execute(self, model, filename_prefix):
        f = folders()
        n = 1
        while (target := f.output_path(f"{filename_prefix}_{n:05d}")).exists():
            n += 1
        # the base as it should be saved, whatever ran on the pool before (schedulers, tokenizers)
        pipe = model_pool().pipeline_to_save(model, check_interrupt=current_context().check_interrupt)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {"ui": {"pipelines": [output_ref(target)], "text": [f"saved {model.describe()} to {target.name}"]}}
