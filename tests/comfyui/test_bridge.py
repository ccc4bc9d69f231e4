"""The bridge node (LoraLoomApplyLoRA) inside real ComfyUI: our LoRA values, merged with block
weights, on ComfyUI's own checkpoint, CLIP and KSampler (see conftest.py for when these run).

The checkpoint is `fixtures.write_comfy_checkpoint`'s SD1.5 (ComfyUI's core CheckpointLoaderSimple
loads it; LoadBase loads the same file with its config folder)."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import COMFYUI, ROOT, comfyui_base, comfyui_python, start_comfyui

CHECKPOINT = "tinysd15.safetensors"
BLOCKS = '{"BASE": 0.5, "IN01": 0.25, "M00": 0, "OUT03": 1.5}'
# The bridge takes a LoRA value, whatever made it: one merge method here (PeftMerge's methods are tested
# against peft's add_weighted_adapter in tests/lora); each case costs a minute of CPU sampling.
METHODS = ("ties_svd",)


@pytest.fixture(scope="module")
def bridge_comfy(tmp_path_factory):
    """ComfyUI with our pack, the SD1.5 checkpoint, its LoRAs and the tiny presets' LoRA fixtures."""
    from loraloom.fixtures import write_comfy_checkpoint, write_comfy_loras

    base = tmp_path_factory.mktemp("comfyui-bridge")
    names = comfyui_base(base)
    models = base / "models"
    checkpoint, config = write_comfy_checkpoint(models / "checkpoints" / CHECKPOINT)
    names.update({k: p.name for k, p in write_comfy_loras(models / "loras").items()})
    server = start_comfyui(base, names)
    running = next(server)
    running.checkpoint, running.config = checkpoint, config
    yield running
    next(server, None)


def sampler(model, clip, prefix: str, at: int = 20, seed: int = 3) -> dict:
    """Core text encode, KSampler, VAE decode and SaveImage on ``model`` / ``clip`` (links), as nodes
    ``at`` .. ``at + 5`` (SaveImage last); the VAE is the checkpoint loader's (node "1")."""
    n = [str(at + i) for i in range(6)]
    return {
        n[0]: {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a photo of a cat"}},
        n[1]: {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        n[2]: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        n[3]: {"class_type": "KSampler", "inputs": {"model": model, "positive": [n[0], 0], "negative": [n[1], 0],
                                                    "latent_image": [n[2], 0], "seed": seed, "steps": 3, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        n[4]: {"class_type": "VAEDecode", "inputs": {"samples": [n[3], 0], "vae": ["1", 2]}},
        n[5]: {"class_type": "SaveImage", "inputs": {"images": [n[4], 0], "filename_prefix": prefix}},
    }


def graph(lora_chain: dict, model, clip, prefix: str = "bridge") -> dict:
    """A core checkpoint loader as node "1", ``lora_chain`` (prompt entries), and `sampler` on
    ``model`` / ``clip`` (its image from node "25")."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
            **lora_chain, **sampler(model, clip, prefix)}


def merge(prompts, method: str) -> dict:
    """Our LoadLoRA x2 -> PeftMerge entries (nodes 2, 3, 4)."""
    return {"2": {"class_type": "LoadLoRA", "inputs": {"lora_name": "comfy-a.safetensors"}},
            "3": {"class_type": "LoadLoRA", "inputs": {"lora_name": "comfy-b.safetensors"}},
            "4": prompts.full("PeftMerge", lora_a=["2", 0], lora_b=["3", 0], weight_a=0.7, weight_b=0.5,
                              method=method, svd_rank=8)}


def bridge(prompts, lora, strength_model=0.8, strength_clip=0.6, block_weights="") -> dict:
    return {"5": {"class_type": "LoraLoomApplyLoRA",
                  "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": lora, "strength_model": strength_model,
                             "strength_clip": strength_clip, "block_weights": block_weights}}}


def image(server, done: dict, node: str = "25") -> np.ndarray:
    assert done["status"]["status_str"] == "success", done["status"]
    ref = done["outputs"][node]["images"][0]
    return np.asarray(Image.open(server.base / "output" / ref["subfolder"] / ref["filename"]))


def run_image(server, prompt: dict, node: str = "25") -> np.ndarray:
    return image(server, server.run(prompt), node)


def test_bridge_is_listed_inside_comfyui_with_comfyui_sockets(bridge_comfy):
    info = bridge_comfy.call("GET", "/object_info/LoraLoomApplyLoRA")[1]["LoraLoomApplyLoRA"]
    inputs = {name: spec[0] for part in info["input"].values() for name, spec in part.items()}
    assert inputs["model"] == "MODEL" and inputs["clip"] == "CLIP" and inputs["lora"] == "LORA_WEIGHTS", info
    assert info["input_order"]["optional"] == ["clip"], info
    assert info["output"] == ["MODEL", "CLIP"] and info["display_name"].startswith("Loom "), info


@pytest.mark.parametrize("method", METHODS)
def test_a_merge_through_the_bridge_samples_as_core_loraloader_does_with_the_saved_merge(bridge_comfy, prompts, method):
    server = bridge_comfy
    plain = run_image(server, graph({}, ["1", 0], ["1", 1], prefix="plain"))
    prefix = f"loras/merged-{method}"
    chain = {**merge(prompts, method), **bridge(prompts, ["4", 0]),
             "6": prompts.full("SaveLoRA", lora=["4", 0], filename_prefix=prefix, format="kohya", dtype="fp32")}
    done = server.run(graph(chain, ["5", 0], ["5", 1]))
    ours = image(server, done)
    report = done["outputs"]["5"]["text"][0]
    assert "unet: " in report and "text_encoder: 24 modules patched" in report, report

    # what the user would do next: load the saved merge with core's LoraLoader (SaveLoRA wrote it into
    # ComfyUI's loras folder, where that loader lists it)
    saved = f"merged-{method}_00001_.safetensors"
    assert saved in server.call("GET", "/object_info/LoraLoader")[1]["LoraLoader"]["input"]["required"]["lora_name"][0]
    core = {"5": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                         "lora_name": saved,
                                                         "strength_model": 0.8, "strength_clip": 0.6}}}
    theirs = run_image(server, graph(core, ["5", 0], ["5", 1], prefix="core"))
    assert np.array_equal(ours, theirs), f"{method}: max pixel difference {np.abs(ours.astype(int) - theirs).max()}"
    assert np.abs(ours.astype(int) - plain).max() > 8, f"{method}: the LoRA should change the image"

    blocks = run_image(server, graph({**merge(prompts, method), **bridge(prompts, ["4", 0], block_weights=BLOCKS)},
                                     ["5", 0], ["5", 1], prefix="blocks"))
    assert not np.array_equal(blocks, ours), f"{method}: block weights should change the image"


def test_strength_zero_is_no_lora_and_the_inputs_stay_unpatched(bridge_comfy, prompts):
    server = bridge_comfy
    plain = run_image(server, graph({}, ["1", 0], ["1", 1], prefix="plain"))
    chain = {"2": {"class_type": "LoadLoRA", "inputs": {"lora_name": "comfy-locon.safetensors"}},
             **bridge(prompts, ["2", 0], strength_model=0.0, strength_clip=0.0)}
    assert np.array_equal(run_image(server, graph(chain, ["5", 0], ["5", 1], prefix="zero")), plain)

    # the bridge patches clones: a KSampler on the loader's own model and CLIP, in the same prompt as
    # one on the patched ones, samples the plain model
    chain = {"2": {"class_type": "LoadLoRA", "inputs": {"lora_name": "comfy-locon.safetensors"}},
             **bridge(prompts, ["2", 0], strength_model=1.0, strength_clip=1.0),
             **sampler(["5", 0], ["5", 1], "patched", at=30)}
    done = server.run(graph(chain, ["1", 0], ["1", 1], prefix="beside"))
    assert np.array_equal(image(server, done), plain), "the bridge's input model was patched"
    assert not np.array_equal(image(server, done, "35"), plain), "the LoCon should change the image"


@pytest.mark.parametrize("lora, expect", [
    ("tiny-sdxl/kohya", "The LoRA looks like sdxl"),
    ("tiny-sd15/kohya", "shape [8, 8, 1, 1], weight diffusion_model.input_blocks.1.1.proj_in.weight is [320, 320, 1, 1]"),
])
def test_a_lora_that_does_not_fit_the_model_is_refused_naming_its_modules(bridge_comfy, prompts, lora, expect):
    server = bridge_comfy
    name = server.names[lora]
    chain = {"2": {"class_type": "LoadLoRA", "inputs": {"lora_name": name}}, **bridge(prompts, ["2", 0])}
    done = server.run(graph(chain, ["5", 0], ["5", 1]))
    errors = [data for kind, data in done["status"]["messages"] if kind == "execution_error"]
    assert errors and errors[0]["node_type"] == "LoraLoomApplyLoRA", done["status"]
    message = errors[0]["exception_message"]
    assert errors[0]["exception_type"] == "loraloom.LoRAMatchError", errors[0]
    assert "node LoraLoomApplyLoRA" in message and "fit no weight of this SD15 model" in message, message
    assert expect in message and "Fix: use a LoRA made for this model's architecture" in message, message
    assert "lora key not loaded:" not in server.log.read_text(), "nothing reaches ComfyUI's own silent skip"


@pytest.mark.parametrize("strength_model, strength_clip, block_weights", [(0.8, 0.6, BLOCKS), (1.0, 1.0, "")])
def test_comfyui_weights_change_exactly_as_our_model_pool_changes_the_diffusers_model(
        bridge_comfy, tmp_path, strength_model, strength_clip, block_weights):
    """ComfyUI's patched weights minus its base, layer by layer, against the deltas our pool applies
    to the diffusers model of the same file (LoadBase with the config folder), and both denoisers'
    outputs on one input."""
    from safetensors.torch import load_file, save_file

    from loraloom.bases.pool import Application, ModelPool, ModelRecipe
    from loraloom.lora.blocks import block_scales
    from loraloom.lora.combine import merge_lora_values
    from loraloom.lora.readers import read_lora
    from loraloom.lora.writers import write_kohya

    server = bridge_comfy
    loras = [read_lora(server.base / "models" / "loras" / f"comfy-{n}.safetensors") for n in ("a", "locon")]
    # the merge runs here, once: both sides then read the same file
    merged, _ = merge_lora_values(loras, "svd", [0.7, 0.5])
    write_kohya(merged, tmp_path / "merged.safetensors")
    lora = read_lora(tmp_path / "merged.safetensors")  # the file both sides read
    gen = torch.Generator().manual_seed(5)
    inputs = {"x": torch.randn(1, 4, 8, 8, generator=gen), "t": torch.tensor([500.0]),
              "context": torch.randn(1, 77, 768, generator=gen)}
    save_file(inputs, tmp_path / "inputs.safetensors")

    args = {"checkpoint": str(server.checkpoint), "lora": str(tmp_path / "merged.safetensors"),
            "strength_model": strength_model, "strength_clip": strength_clip, "block_weights": block_weights,
            "inputs": str(tmp_path / "inputs.safetensors"), "out": str(tmp_path / "comfy.safetensors")}
    (tmp_path / "args.json").write_text(json.dumps(args))
    out = run_probe("bridge_probe.py", str(tmp_path / "args.json"), tmp_path=tmp_path)
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["unpatched_after"] and facts["input_patches"] == 0 and facts["input_clip_patches"] == 0, facts
    comfy = load_file(tmp_path / "comfy.safetensors")

    pool = ModelPool()
    base = pool.load(str(server.checkpoint), dtype="fp32", device="cpu", config=str(server.config))
    plain_pipe = pool.plain(base)
    plain = {f"unet.{k}": v.clone() for k, v in plain_pipe.unet.state_dict().items()}
    plain.update({f"text_encoder.{k}": v.clone() for k, v in plain_pipe.text_encoder.state_dict().items()})
    with torch.no_grad():
        ours_base = plain_pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
    scales = block_scales(block_weights, "sd15", lora.components) if block_weights else {}
    pipe = pool.pipeline(ModelRecipe(base, adapters=(Application(lora, "merged", strength_model, strength_clip,
                                                                 scales),)))
    patched = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    patched.update({f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    ours = {k: patched[k] - plain[k] for k in plain if not torch.equal(patched[k], plain[k])}

    theirs = {k: v for k, v in comfy.items() if not k.startswith("denoiser_") and v.abs().max() > 0}
    assert set(ours) == set(theirs), f"layers only ours: {sorted(set(ours) - set(theirs))[:5]}, only ComfyUI's: " \
                                     f"{sorted(set(theirs) - set(ours))[:5]}"
    worst = 0.0
    for key, delta in ours.items():
        # fp32 rounding: both sides round W0 + delta to float32 once, after float32 maths in another
        # order (ComfyUI: (strength * alpha / rank) * (up @ down); our pool: the scaled factors in one
        # matmul), so a few ulp of the largest of W0 and the patched weight
        ulp = max(plain[key].abs().max().item(), patched[key].abs().max().item()) * 2 ** -23
        err = (delta - theirs[key].reshape(delta.shape)).abs().max().item()
        worst = max(worst, err / ulp)
        assert err <= 8 * ulp, f"{key}: deltas differ by {err:.3g} ({err / ulp:.1f} ulp of the weight)"
    print(f"\nlayers {len(ours)}: worst delta difference {worst:.2f} ulp of the weight")

    with torch.no_grad():
        ours_lora = pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
    effect = (ours_lora - ours_base).abs().max().item()
    gap = (ours_lora - comfy["denoiser_lora"]).abs().max().item()
    base_gap = (ours_base - comfy["denoiser_base"]).abs().max().item()
    print(f"denoiser: LoRA effect {effect:.3g}, ours vs ComfyUI with LoRA {gap:.3g}, without {base_gap:.3g}")
    assert effect > 1e-2 and gap < 1e-3 * effect + 1e-4 and base_gap < 1e-4, (effect, gap, base_gap)


WORKFLOW = ROOT / "workflows" / "comfyui" / "merge_on_checkpoint"


def comfy_registry(object_info: dict):
    """A registry holding ComfyUI's core nodes as its /object_info describes them (stand-ins that are
    never run) and our nodes, for our editor-format converter (graph_runtime.workflow)."""
    from loraloom.graph_runtime import (Boolean, Combo, Float, Int, Link, NodeRegistry, Output, String,
                                        node)
    from loraloom.nodes import COMFY_ONLY, registry

    def stand_in(name: str, info: dict):
        inputs = []
        for part in ("required", "optional"):
            for key, (kind, *rest) in info["input"].get(part, {}).items():
                opts, optional = (rest[0] if rest else {}), part == "optional"
                if isinstance(kind, list):
                    inputs.append(Combo(key, kind, opts.get("default", kind[0]), optional=optional))
                elif kind == "INT":
                    inputs.append(Int(key, opts.get("default", 0), min=opts.get("min"), max=opts.get("max"),
                                      optional=optional, control_after_generate=opts.get("control_after_generate", False)))
                elif kind == "FLOAT":
                    inputs.append(Float(key, opts.get("default", 0.0), min=opts.get("min"), max=opts.get("max"),
                                        optional=optional))
                elif kind == "STRING":
                    inputs.append(String(key, opts.get("default", ""), multiline=opts.get("multiline", False),
                                         optional=optional))
                elif kind == "BOOLEAN":
                    inputs.append(Boolean(key, opts.get("default", False), optional=optional))
                else:
                    inputs.append(Link(key, kind, optional=optional))
        outputs = [Output(t, n) for t, n in zip(info["output"], info["output_name"])]

        class Core:
            def execute(self, **inputs):
                raise AssertionError("a stand-in for a ComfyUI node never runs")

        return node(id=name, category="core", inputs=inputs, outputs=outputs, output_node=info["output_node"],
                    comfy_only=True)(Core)

    ours = [registry().get(cid) for cid in registry() if cid not in object_info]
    return NodeRegistry([stand_in(n, i) for n, i in object_info.items()] + ours + list(COMFY_ONLY), comfy=True)


def test_the_shipped_comfyui_workflow_opens_as_the_api_form_and_runs_in_comfyui(bridge_comfy):
    from loraloom.graph_runtime.workflow import ui_to_api

    server = bridge_comfy
    api = json.loads(WORKFLOW.with_name(WORKFLOW.name + "_api.json").read_text())
    ui = json.loads(WORKFLOW.with_suffix(".json").read_text())
    core = {e["class_type"] for e in api.values()} - {"LoraLoomLoadLoRA", "LoraLoomPeftMerge", "LoraLoomApplyLoRA"}
    object_info = {name: server.call("GET", f"/object_info/{name}")[1][name] for name in sorted(core)}
    # what the editor queues for the UI file, read with ComfyUI's own node definitions, is the API file
    converted = ui_to_api(ui, comfy_registry(object_info))
    assert {k: (v["class_type"], v["inputs"]) for k, v in converted.items()} \
        == {k: (v["class_type"], v["inputs"]) for k, v in api.items()}

    # the API form on the test checkpoint and LoRAs, at a size a CPU samples in seconds
    api["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    api["2"]["inputs"]["lora_name"], api["3"]["inputs"]["lora_name"] = "comfy-a.safetensors", "comfy-b.safetensors"
    api["8"]["inputs"].update(width=64, height=64)
    api["9"]["inputs"]["steps"] = 2
    done = server.run(api)
    assert done["status"]["status_str"] == "success", done["status"]
    assert "block weights: " in done["outputs"]["5"]["text"][0], done["outputs"]["5"]
    assert done["outputs"]["11"]["images"], done["outputs"]


def run_probe(script: str, *args: str, tmp_path) -> str:
    """Run ``tests/comfyui/<script>`` with ComfyUI's Python in the ComfyUI folder, this checkout importable
    as ``loraloom``; returns its stdout."""
    from pathlib import Path

    path = tmp_path / "importable"
    path.mkdir(exist_ok=True)
    if not (path / "loraloom").exists():
        (path / "loraloom").symlink_to(ROOT, target_is_directory=True)
    folder = Path(COMFYUI).resolve()
    probe = subprocess.run([comfyui_python(folder), str(ROOT / "tests" / "comfyui" / script), *args], cwd=folder,
                           capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(path)})
    assert probe.returncode == 0, probe.stderr[-3000:]
    return probe.stdout


def test_every_module_of_full_size_sd15_sdxl_flux_and_sd35_lands_on_a_comfyui_weight(tmp_path):
    """ComfyUI's own models and key maps at the real sizes (meta device: names and shapes only)."""
    report = json.loads(run_probe("keymap_probe.py", tmp_path=tmp_path).strip().splitlines()[-1])
    expected = {"sd15": "SD15", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3"}
    for arch, model in expected.items():
        for part in (arch, arch + " text"):
            entry = report[part]
            assert entry["unmatched_count"] == 0 and entry["placed"] == entry["modules"] > 0, (part, entry)
        assert report[arch]["model"] == model, report[arch]
    # every layer a LoRA can target, on each side: UNet / transformer modules, then the text encoders'
    assert {a: report[a]["modules"] for a in expected} == {"sd15": 282, "sdxl": 794, "flux": 504, "sd3": 537}
    assert {a: report[a + " text"]["modules"] for a in expected} == {"sd15": 72, "sdxl": 265, "flux": 240, "sd3": 434}
