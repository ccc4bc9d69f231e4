"""Draw the README's side-by-side picture: the shipped `shapes_blend` workflow on `tiny-sdxl-shapes`
run seven ways — the base alone, each demo LoRA alone, both blended, the blend on the UNet's input
blocks only and on its output blocks only (block weights, presets SDXL-INALL / SDXL-OUTALL), and both
merged into one LoRA (PeftMerge, svd) — one labelled strip.

    python bench/demo_strip.py [OUT.png]      (default: docs/images/shapes_strip.png)

Everything runs through the Python API on the shipped files; same seed in every tile.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "workflows" / "api" / "shapes_blend_api.json"
SCALE = 2  # 64 px tiles, enlarged (nearest neighbour) to be seen


def variants() -> list[tuple[str, dict]]:
    """(label, API-format workflow) for each tile."""
    blend = json.loads(WORKFLOW.read_text())

    def weighted(red: float, stripes: float, block_weights: str = "") -> dict:
        wf = json.loads(json.dumps(blend))
        wf["4"]["inputs"].update(weight=red, text_encoder_weight=red, weight_2=stripes, block_weights=block_weights)
        return wf

    merged = weighted(1.0, 0.0)
    merged["7"] = {"class_type": "PeftMerge",
                   "inputs": {"lora_a": ["2", 0], "weight_a": 1.0, "lora_b": ["3", 0], "weight_b": 1.0,
                              "method": "svd", "density": 0.5, "majority_sign_method": "total", "svd_rank": 0,
                              "svd_clamp": 0.0, "seed": 0}}
    merged["4"]["inputs"]["lora"] = ["7", 0]
    for key in ("lora_2", "weight_2"):
        merged["4"]["inputs"].pop(key)
    return [("base", weighted(0.0, 0.0)), ("+ demo-red", weighted(1.0, 0.0)),
            ("+ demo-stripes", weighted(0.0, 1.0)), ("blend 1.0 + 1.0", weighted(1.0, 1.0)),
            ("blend, IN blocks", weighted(1.0, 1.0, "SDXL-INALL")),
            ("blend, OUT blocks", weighted(1.0, 1.0, "SDXL-OUTALL")), ("merge (svd)", merged)]


def main(argv: list[str]) -> int:
    from PIL import Image, ImageDraw

    from loraloom import Runtime

    out = Path(argv[0]) if argv else REPO / "docs" / "images" / "shapes_strip.png"
    sample = json.loads(WORKFLOW.read_text())["5"]["inputs"]
    tiles = []
    with tempfile.TemporaryDirectory() as scratch:
        rt = Runtime(output_dir=scratch, demo_loras=True)
        for index, (label, wf) in enumerate(variants()):
            wf["6"]["inputs"]["filename_prefix"] = f"tile{index}"
            rt.run(wf)
            (png,) = Path(scratch).glob(f"tile{index}_*.png")
            tiles.append((label, Image.open(png).convert("RGB")))
    size = tiles[0][1].width * SCALE
    strip = Image.new("RGB", (size * len(tiles), size + 32), "white")
    draw = ImageDraw.Draw(strip)
    for i, (label, image) in enumerate(tiles):
        strip.paste(image.resize((size, size), Image.NEAREST), (i * size, 0))
        draw.text((i * size + 4, size + 2), label, fill="black")
    draw.text((4, size + 17), f'prompt "{sample["prompt"]}", seed {sample["seed"]}, {sample["steps"]} steps',
              fill="gray")
    out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(out, optimize=True)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
