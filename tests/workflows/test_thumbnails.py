"""Thumbnails of the shipped editor workflows (``workflows/<name>.jpg``, the image each workflow makes):
what ComfyUI's template browser, and ``loraloom serve``'s, shows beside each template.

Re-make them after changing a workflow: ``python tests/workflows/test_thumbnails.py``.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
SIZE = 256  # the longer side, in pixels
QUALITY = 85
MAX_BYTES = 48 * 1024


def render(name: str, out_dir: Path):
    """The image the shipped workflow ``name`` saves (its last image output), scaled so that its
    longer side is SIZE, as an RGB PIL image."""
    from PIL import Image

    from loraloom import Runtime

    rt = Runtime(lora_dirs=[out_dir / "no-loras"], output_dir=out_dir, demo_loras=True)
    result = rt.run(WORKFLOWS / f"{name}.json")
    images = [image for ui in result.outputs.values() for image in (ui or {}).get("images", [])]
    assert images, f"{name}: the workflow saved no image"
    last = images[-1]
    picture = Image.open(out_dir / last.get("subfolder", "") / last["filename"]).convert("RGB")
    scale = SIZE / max(picture.size)
    return picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.LANCZOS)


def test_every_editor_workflow_has_a_small_jpeg_thumbnail():
    from PIL import Image

    assert NAMES and "shapes_blend" in NAMES, NAMES
    for name in NAMES:
        path = WORKFLOWS / f"{name}.jpg"
        assert path.is_file(), f"{name}: no thumbnail; make it with `python {Path(__file__).relative_to(WORKFLOWS.parent)}`"
        with Image.open(path) as image:
            assert image.format == "JPEG" and max(image.size) == SIZE, (name, image.format, image.size)
        assert path.stat().st_size <= MAX_BYTES, (name, path.stat().st_size)
    strays = sorted(p.name for p in WORKFLOWS.glob("*.jpg") if p.stem not in NAMES)
    assert not strays, f"thumbnails of no workflow: {strays}"


def test_a_thumbnail_is_the_image_its_workflow_makes(tmp_path):
    import numpy as np
    from PIL import Image

    made = np.asarray(render("shapes_blend", tmp_path), dtype=np.float32)
    shipped = np.asarray(Image.open(WORKFLOWS / "shapes_blend.jpg").convert("RGB"), dtype=np.float32)
    other = np.asarray(Image.open(WORKFLOWS / "blend.jpg").convert("RGB").resize(made.shape[1::-1]), dtype=np.float32)
    assert shipped.shape == made.shape
    assert np.abs(shipped - made).mean() < 3, "the thumbnail is this workflow's image (up to JPEG rounding)"
    assert np.abs(other - made).mean() > 10, "and not another workflow's"


if __name__ == "__main__":
    for workflow in sys.argv[1:] or NAMES:
        with tempfile.TemporaryDirectory() as tmp:
            render(workflow, Path(tmp)).save(WORKFLOWS / f"{workflow}.jpg", "JPEG", quality=QUALITY, optimize=True)
        print(f"workflows/{workflow}.jpg")
