"""Stand-ins for ComfyUI's own SaveImage and PreviewImage, with the same ids and inputs, so a workflow
runs unchanged headless and in ComfyUI (where ComfyUI's core nodes are used: these are not exported)."""

from __future__ import annotations

import io
import json

from ..atomic import atomic_write_bytes
from ..graph_runtime import TEMP_SUBFOLDER, Link, String, current_context, node
from .common import CATEGORY, IMAGE, check_prefix, output_ref, unique_output


def png_bytes(image, prompt: dict | None, workflow: dict | None) -> bytes:
    """One [H, W, C] float image in 0..1 as PNG bytes, with the workflow embedded as ComfyUI does
    (tEXt ``prompt``: the API prompt; tEXt ``workflow``: the editor graph)."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    array = (image.clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    if workflow is not None:
        info.add_text("workflow", json.dumps(workflow))
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG", pnginfo=info,
                                                                           compress_level=4)
    return buf.getvalue()


def save_images(images, prefix: str, kind: str) -> list[dict]:
    ctx = current_context()
    refs = []
    for image in images:
        path = unique_output(prefix, ".png")
        atomic_write_bytes(path, png_bytes(image, ctx.prompt, ctx.workflow))
        refs.append(output_ref(path, kind))
    return refs


@node(id="SaveImage", category=f"{CATEGORY}/image", display_name="Save Image", output_node=True,
      inputs=[Link("images", IMAGE), String("filename_prefix", "ComfyUI")], outputs=[], comfy_export=False)
class SaveImage:
    """Save images as PNG files in the output folder, with the workflow embedded."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        return check_prefix(constants)

    def execute(self, images, filename_prefix):
        return {"ui": {"images": save_images(images, filename_prefix, "output")}}


@node(id="PreviewImage", category=f"{CATEGORY}/image", display_name="Preview Image", output_node=True,
      inputs=[Link("images", IMAGE)], outputs=[], comfy_export=False)
class PreviewImage:
    """Write images to the output folder's temp/ subfolder for viewing."""

    def execute(self, images):
        return {"ui": {"images": save_images(images, f"{TEMP_SUBFOLDER}/preview", "temp")}}
