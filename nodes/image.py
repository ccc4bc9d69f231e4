"""Stand-ins for ComfyUI's own SaveImage and PreviewImage, with the same ids and inputs, so a workflow
runs unchanged headless and in ComfyUI (where ComfyUI's core nodes are used: these are not exported)."""

from __future__ import annotations

import io
import json

from ..atomic import atomic_write_bytes
from ..graph_runtime import TEMP_SUBFOLDER, Link, String, current_context, node
from .common import CATEGORY, IMAGE, check_prefix, expand_prefix, new_output, output_ref


def image_uint8(image):
    """One [H, W, C] float image in 0..1 as the uint8 array a PNG holds (rounded, not truncated): the one
    place the rounding is, so a sweep cell's pixels are those SaveImage writes."""
    import numpy as np

    return (image.clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)


def encode_png(image, texts: dict[str, str]) -> bytes:
    """A uint8 [H, W, C] array (or a PIL image) as PNG bytes carrying ``texts`` as tEXt chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, text in texts.items():
        info.add_text(key, text)
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def workflow_texts(prompt: dict | None, workflow: dict | None) -> dict[str, str]:
    """The tEXt chunks that embed a workflow as ComfyUI does (``prompt``: the API prompt; ``workflow``:
    the editor graph), the ones given."""
    texts = {}
    if prompt is not None:
        texts["prompt"] = json.dumps(prompt)
    if workflow is not None:
        texts["workflow"] = json.dumps(workflow)
    return texts


def png_bytes(image, prompt: dict | None, workflow: dict | None) -> bytes:
    """One [H, W, C] float image in 0..1 as PNG bytes, with the workflow embedded (`workflow_texts`)."""
    return encode_png(image_uint8(image), workflow_texts(prompt, workflow))


def save_images(images, prefix: str, kind: str) -> list[dict]:
    """Each image of the batch as a new numbered PNG (ComfyUI's variables in ``prefix`` expanded,
    ``%batch_num%`` in the file name being the image's index); their references for the UI."""
    ctx = current_context()
    prefix = expand_prefix(prefix, width=images[0].shape[1], height=images[0].shape[0]) if len(images) else prefix
    folder, _, name = prefix.rpartition("/")
    refs = []
    for index, image in enumerate(images):
        name_i = name.replace("%batch_num%", str(index))
        with new_output(f"{folder}/{name_i}" if folder else name_i, ".png") as new:
            atomic_write_bytes(new.stage, png_bytes(image, ctx.prompt, ctx.workflow))
        refs.append(output_ref(new.path, kind))
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
