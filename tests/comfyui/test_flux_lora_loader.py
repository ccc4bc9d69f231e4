"""Our kohya-layout Flux files through ComfyUI's own LoRA loader (comfy.lora in the real ComfyUI 0.3.64):
every key loads and each fused weight gets exactly our delta (LoKr on linear1 with Kronecker blocks
straddling q / k / v / mlp included), or, for q / k / v parts whose scales are not powers of two
apart, our delta within fp32 rounding. Runs in ComfyUI's Python, in-process, with no server (see
conftest.py for when it runs)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from loraloom.fixtures import _loha_module, _lokr_module
from loraloom.lora.canonical import LoRA, LoRAModule, delta
from loraloom.lora.dit_keys import original_name_table, split_module, targets_for
from loraloom.lora.writers import write_kohya

from .conftest import COMFYUI, comfyui_python

# Runs in ComfyUI's environment: a tiny comfy Flux model (real block counts), its weight shapes, and
# the delta comfy.lora gives each weight for each file (from zero weights: comfy leaves weights
# uninitialised), with the keys its loader reports as not loaded.
_COMFY_SCRIPT = r"""
import json, logging, sys
import torch
sys.argv = ["x", "--cpu"]
import comfy.options; comfy.options.enable_args_parsing()
import comfy.lora, comfy.supported_models
from safetensors.torch import load_file
out = sys.stdin.readline().strip()
config = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 16,
          "context_in_dim": 16, "hidden_size": 16, "mlp_ratio": 4.0, "num_heads": 2, "depth": 19,
          "depth_single_blocks": 38, "axes_dim": [2, 2, 4], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
model = comfy.supported_models.Flux(config).get_model({}, device="cpu")
sd = model.state_dict()
json.dump({k: list(v.shape) for k, v in sd.items() if k.endswith(".weight")}, open(out + "/shapes.json", "w"))
print("shapes", flush=True)
key_map = comfy.lora.model_lora_keys_unet(model, {})
for name in sys.stdin.readline().split():
    missing = []
    class Catch(logging.Handler):
        def emit(self, record):
            missing.append(record.getMessage())
    catch = Catch(); logging.getLogger().addHandler(catch)
    patches = comfy.lora.load_lora(load_file(f"{out}/{name}.safetensors"), key_map)
    logging.getLogger().removeHandler(catch)
    deltas = {k: comfy.lora.calculate_weight([(1.0, a, 1.0, None, None)], torch.zeros(sd[k].shape), k) for k, a in patches.items()}
    torch.save({"deltas": deltas, "not_loaded": [m for m in missing if "not loaded" in m]}, f"{out}/{name}.pt")
print("done", flush=True)
"""


def test_comfyui_loader_reads_our_flux_files_exactly(tmp_path):
    folder = Path(COMFYUI).resolve()
    proc = subprocess.Popen([comfyui_python(folder), "-c", _COMFY_SCRIPT], cwd=folder,
                            env={**os.environ, "PYTHONPATH": str(folder)}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    proc.stdin.write(f"{tmp_path}\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "shapes"
    shapes = json.loads((tmp_path / "shapes.json").read_text())
    table = [(n, t, tuple(shapes[f"diffusion_model.{n}.weight"])) for n, t in original_name_table(
        "flux", {"double_blocks": 19, "single_blocks": 38}) if f"diffusion_model.{n}.weight" in shapes]  # fmt: skip
    assert len(table) == 19 * 10 + 38 * 3 + 10
    gen = torch.Generator().manual_seed(0)

    def lora_pair(index, shape):
        rank = 4 if index % 2 else 8
        return LoRAModule(down=torch.randn(rank, shape[1], generator=gen), up=torch.randn(shape[0], rank, generator=gen),
                          alpha=float(2 + index % 3))  # fmt: skip

    expected = {}
    makers = {"shared": lora_pair, "loha": lambda i, s: _loha_module(gen, s, i), "lokr": lambda i, s: _lokr_module(gen, s, i)}
    for name, maker in makers.items():  # one LoRA per original module, split as a reader splits it
        modules, want = {}, {}
        for index, (original, targets, shape) in enumerate(table):
            # LoKr: linear1 (112 rows) is 8 x 14 blocks, straddling q / k / v / mlp (16 rows each)
            fused = maker(index, shape)
            modules.update((t.path, split_module(fused, t.segments, original)) for t in targets_for(original, targets, shape))
            want[f"diffusion_model.{original}.weight"] = delta(fused, shape)
        write_kohya(LoRA({"transformer": modules}, source_format="derived", fingerprint=name), tmp_path / f"{name}.safetensors")
        expected[name] = want
    # separate q / k / v (/ mlp) LoRAs with their own downs: stacked downs; with one scale, with
    # scales powers of two apart (exact) and with scales 1, 1.5, 2, 2.5 apart (one alpha, the ratios in the ups)
    alphas = {"stacked": lambda j: (2 + j) / 2, "scales": lambda j: (2 + j) * 2.0**-j, "ratios": lambda j: 1 + j / 2}
    for name, alpha in alphas.items():
        modules, want = {}, {}
        for original, targets, shape in table:
            if len(targets) >= 3:
                parts = []
                for j, t in enumerate(targets):
                    height = shape[1] if t.segments[0][1] is not None else shape[0] - 3 * shape[1]
                    modules[t.path] = LoRAModule(down=torch.randn(2 + j, shape[1], generator=gen),
                                                 up=torch.randn(height, 2 + j, generator=gen), alpha=alpha(j))  # fmt: skip
                    parts.append(delta(modules[t.path]))
                want[f"diffusion_model.{original}.weight"] = torch.cat(parts)
        write_kohya(LoRA({"transformer": modules}, source_format="derived", fingerprint=name), tmp_path / f"{name}.safetensors")
        expected[name] = want
    out, _ = proc.communicate(" ".join(expected) + "\n", timeout=600)
    assert proc.returncode == 0 and out.strip() == "done"
    for name, want in expected.items():
        result = torch.load(tmp_path / f"{name}.pt")
        assert result["not_loaded"] == [], f"{name}: ComfyUI did not load {result['not_loaded'][:3]}"
        assert result["deltas"].keys() == want.keys(), name
        for key, value in want.items():
            if name == "ratios":  # each part's up rounded once by its scale's ratio to the file's
                torch.testing.assert_close(result["deltas"][key], value, atol=1e-6, rtol=1e-6, msg=f"{name}: {key}")
            else:
                assert torch.equal(result["deltas"][key], value), f"{name}: {key}"
