"""ComfyUI's own model folders in real ComfyUI: LoadBase lists the checkpoints its checkpoint loader
lists (an extra_model_paths.yaml folder too) and runs them with config "auto" (our own files from
their recorded configs; a foreign file from its shapes, with ComfyUI's own CLIP tokenizer; a Flux
transformer from diffusion_models with its text encoders and VAE from ComfyUI's folders); SaveLoRA
writes where core's LoraLoader and our LoadLoRA list the file, loadable in the next prompt."""

import shutil
import time

import pytest
import torch

from tests.comfyui.conftest import comfyui_base, start_comfyui

EXTRA = "extra"  # the extra_model_paths.yaml base folder, inside the ComfyUI base folder


@pytest.fixture(scope="module")
def comfyui_extra(tmp_path_factory, tiny_model_files, standard_checkpoint):
    """ComfyUI whose extra_model_paths.yaml adds a checkpoints folder and a loras folder; our tiny
    presets' SaveCheckpoint files in both checkpoints folders; a foreign SD1.5 file (no recorded
    configs, the real CLIP vocabulary size) whose tokenizer only ComfyUI has. The Hugging Face cache is
    pointed at an empty folder, so the tokenizer can come from nowhere else."""
    base = tmp_path_factory.mktemp("comfyui-checkpoints")
    names = comfyui_base(base)
    extra = base / EXTRA
    (extra / "ckpts" / "sub").mkdir(parents=True)
    (extra / "more-loras").mkdir()
    shutil.copy(tiny_model_files("tiny-sd15")["single_file"], extra / "ckpts" / "sub" / "sd15.safetensors")
    shutil.copy(tiny_model_files("tiny-sdxl")["single_file"], base / "models" / "checkpoints" / "sdxl.safetensors")
    standard_checkpoint("sd15", extra / "ckpts" / "foreign.safetensors", vocab_size=49408)
    # a small Flux kept as ComfyUI users keep Flux: the transformer in diffusion_models, its text
    # encoders in text_encoders, its VAE in vae; and the same weights as one all-in-one checkpoint.
    # Its tokenizers are ComfyUI's own (the encoders have the real vocabularies' sizes).
    from loraloom import fixtures

    flux = fixtures.dit_parts_pipeline("flux")
    written = fixtures.write_dit_parts(base / "models", "flux", flux, tokenizers=False)
    (base / "models" / "diffusion_models").mkdir(exist_ok=True)
    written["checkpoint"].rename(base / "models" / "diffusion_models" / "flux-parts.safetensors")
    fixtures.write_dit_parts(base / "models", "flux", flux, name="flux-aio", all_in_one=True, tokenizers=False)
    config = base / "extra_model_paths.yaml"
    config.write_text(f"loom_test:\n    base_path: {extra}\n    checkpoints: ckpts\n    loras: more-loras\n")
    server = start_comfyui(base, names, ("--extra-model-paths-config", str(config)),
                           env={"HF_HUB_CACHE": str(base / "no-hub"), "HF_HUB_OFFLINE": "1"})
    running = next(server)
    yield running
    next(server, None)


def _image(comfyui, done, node):
    import numpy as np
    from PIL import Image

    ref = done["outputs"][node]["images"][0]
    return np.asarray(Image.open(comfyui.base / "output" / ref["subfolder"] / ref["filename"]))


def test_load_base_lists_comfyuis_checkpoints_and_runs_one_from_the_extra_folder_with_auto(comfyui_extra, prompts):
    import numpy as np

    sources = comfyui_extra.combo_options("LoadBase", "source")
    for name in ["sub/sd15.safetensors", "sdxl.safetensors", "foreign.safetensors", "model.safetensors"]:
        assert name in sources, sources
    assert not [s for s in sources if s.startswith("checkpoints/")], sources
    core = comfyui_extra.combo_options("CheckpointLoaderSimple", "ckpt_name")
    assert {"sub/sd15.safetensors", "sdxl.safetensors"} <= set(core), f"the names ComfyUI's loader shows: {core}"

    prompt = {"1": prompts.base("sub/sd15.safetensors"), "2": prompts.sample(["1", 0]), "3": prompts.save_image(["2", 0]),
              "4": prompts.base("tiny-sd15"), "5": prompts.sample(["4", 0]), "6": prompts.save_image(["5", 0])}
    done = comfyui_extra.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    assert np.array_equal(_image(comfyui_extra, done, "3"), _image(comfyui_extra, done, "6")), \
        "the checkpoint written from tiny-sd15 samples as tiny-sd15"


def test_a_foreign_checkpoint_runs_with_comfyuis_own_tokenizer(comfyui_extra, prompts):
    prompt = {"1": prompts.base("foreign.safetensors"), "2": prompts.sample(["1", 0]), "3": prompts.save_image(["2", 0])}
    done = comfyui_extra.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]["messages"][-1][1].get("exception_message")
    assert _image(comfyui_extra, done, "3").shape == (64, 64, 3)


def test_a_flux_transformer_in_diffusion_models_runs_with_its_parts_from_comfyuis_folders(comfyui_extra, prompts):
    import numpy as np

    sources = comfyui_extra.combo_options("LoadBase", "source")
    assert {"flux-parts.safetensors", "flux-aio.safetensors"} <= set(sources), sources
    sample = {"guidance": 3.5, "scheduler": "default"}
    prompt = {"1": prompts.base("flux-parts.safetensors"), "2": prompts.sample(["1", 0], **sample),
              "3": prompts.save_image(["2", 0]),
              "4": prompts.base("flux-aio.safetensors"), "5": prompts.sample(["4", 0], **sample),
              "6": prompts.save_image(["5", 0])}
    done = comfyui_extra.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]["messages"][-1][1].get("exception_message")
    separate, aio = _image(comfyui_extra, done, "3"), _image(comfyui_extra, done, "6")
    assert np.array_equal(separate, aio), "the same weights, found in ComfyUI's folders or inside one file"
    assert separate.std() > 1, "a picture, not a flat image"


def test_auto_is_refused_at_queue_time_where_it_cannot_work(comfyui_extra, prompts):
    prompt = {"1": prompts.base("model.safetensors"), "2": prompts.sample(["1", 0]), "3": prompts.save_image(["2", 0]),
              "4": prompts.base("checkpoints/sdxl.safetensors"), "5": prompts.sample(["4", 0]),
              "6": prompts.save_image(["5", 0])}
    status, body = comfyui_extra.call("POST", "/prompt", {"prompt": prompt})
    assert status == 400, body
    errors = {nid: " | ".join(e["details"] for e in entry["errors"]) for nid, entry in body["node_errors"].items()}
    assert "input 'config': model.safetensors: the file is empty" in errors.get("1", ""), errors  # no header to derive configs from
    assert "is not one of" in errors.get("4", ""), errors  # a path in the models folder is not ComfyUI's name


def test_a_saved_lora_is_listed_by_core_and_ours_and_loads_in_the_next_prompt(comfyui_extra, prompts):
    lora = comfyui_extra.names["tiny-sd15/kohya"]
    save = {"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": lora}},
            "2": prompts.full("SaveLoRA", lora=["1", 0], filename_prefix="loras/merged", dtype="fp32")}
    done = comfyui_extra.run(save)
    assert done["status"]["status_str"] == "success", done["status"]
    name = "merged_00001_.safetensors"
    assert (comfyui_extra.base / "models" / "loras" / name).is_file()
    assert name in comfyui_extra.combo_options("LoraLoader", "lora_name"), "core's LoraLoader lists it"
    assert name in comfyui_extra.combo_options("LoadLoRA", "lora_name"), "our LoadLoRA lists it"

    from safetensors.torch import load_file

    prompt = {"1": prompts.base(), "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": name}},
              "3": prompts.full("WeightedBlend", model=["1", 0], lora=["2", 0], weight=0.8),
              "4": prompts.sample(["3", 0]), "5": prompts.save_image(["4", 0])}
    again = comfyui_extra.run(prompt)
    assert again["status"]["status_str"] == "success", again["status"]
    saved = load_file(str(comfyui_extra.base / "models" / "loras" / name))
    original = load_file(str(comfyui_extra.base / "models" / "loras" / lora))
    common = set(saved) & set(original)
    assert common and all(torch.equal(saved[k].float(), original[k].float()) for k in common if k.endswith("weight"))


def _reweighted(src, dst, factor: float) -> None:
    """``src`` written again with its UNet tensors times ``factor``: for factors 1 and another, two
    files of one layout and size, whose images differ."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) * (factor if k.startswith("model.diffusion_model.") else 1.0) for k in f.keys()}
        metadata = f.metadata()
    save_file(tensors, str(dst), metadata)


def _started_at(done: dict) -> float:
    """When ComfyUI started running a prompt (seconds since the epoch), from its history entry."""
    (ms,) = [data["timestamp"] for kind, data in done["status"]["messages"] if kind == "execution_start"]
    return ms / 1000


def test_a_checkpoint_changed_after_queueing_is_read_anew_and_a_truncated_one_fails_clearly(
        comfyui_extra, prompts, tiny_model_files, tmp_path):
    """A checkpoint in ComfyUI's folder overwritten in place (same inode, same size) after its prompt was
    queued, and validated, against the old content: the run loads the new content (not ComfyUI's cache,
    not our model pool's). Cut short instead: the run fails naming the file, and the next one works."""
    import numpy as np

    folder = comfyui_extra.base / "models" / "checkpoints"
    old, changed = tmp_path / "old.safetensors", folder / "changed-new.safetensors"
    _reweighted(tiny_model_files("tiny-sd15")["single_file"], old, 1.0)
    _reweighted(tiny_model_files("tiny-sd15")["single_file"], changed, 1.05)
    assert old.stat().st_size == changed.stat().st_size
    target = folder / "changed.safetensors"
    shutil.copy(old, target)

    def prompt(source: str, seed: int = 1) -> dict:
        return {"1": prompts.base(source), "2": prompts.sample(["1", 0], seed=seed), "3": prompts.save_image(["2", 0])}

    def behind_a_slower_prompt(change) -> dict:
        """Queue the prompt on ``target`` behind a slower one that holds it too (so ComfyUI's cache holds
        its nodes, run on the old content), ``change`` the file once the slower one runs, then run them."""
        slow = comfyui_extra.queue({**prompt("changed.safetensors", seed=3), "11": prompts.base(),
                                    "12": prompts.sample(["11", 0], steps=30, width=128, height=128),
                                    "13": prompts.save_image(["12", 0])})
        queued = comfyui_extra.queue(prompt("changed.safetensors", seed=3))
        for _ in range(600):  # ComfyUI takes a prompt from its queue when free: a loaded machine may lag
            if any(slow in item for item in comfyui_extra.call("GET", "/queue")[1]["queue_running"]):
                break
            time.sleep(0.05)
        change()
        changed_at = time.time()
        slow_done = comfyui_extra.wait(slow)
        done = comfyui_extra.wait(queued)
        assert _started_at(done) > changed_at, "the prompt ran after the change (else the slower prompt was too fast)"
        # The first prompt that started after the change must read the file anew: the queued one, or the
        # slower one where ComfyUI had not begun it yet (then the queued one shares its fresh result).
        first = slow_done if _started_at(slow_done) > changed_at else done
        cached = {n for kind, data in first["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}
        assert "1" not in cached, "ComfyUI's cache did not answer for the changed file"
        return done

    before = comfyui_extra.run(prompt("changed.safetensors", seed=3))
    new = comfyui_extra.run(prompt("changed-new.safetensors", seed=3))
    assert before["status"]["status_str"] == new["status"]["status_str"] == "success"
    assert not np.array_equal(_image(comfyui_extra, before, "3"), _image(comfyui_extra, new, "3"))

    def overwrite():
        with open(target, "r+b") as f:
            f.write(changed.read_bytes())

    done = behind_a_slower_prompt(overwrite)
    assert done["status"]["status_str"] == "success", done["status"]
    assert np.array_equal(_image(comfyui_extra, done, "3"), _image(comfyui_extra, new, "3")), \
        "the run used the new content"

    data = changed.read_bytes()
    failed = behind_a_slower_prompt(lambda: target.write_bytes(data[: len(data) // 2]))
    (error,) = [d for kind, d in failed["status"]["messages"] if kind == "execution_error"]
    assert (error["node_id"], error["exception_type"]) == ("1", "loraloom.BaseModelError"), error
    assert "changed.safetensors" in error["exception_message"] and "truncated" in error["exception_message"], \
        error["exception_message"]
    shutil.copy(changed, target)
    again = comfyui_extra.run(prompt("changed.safetensors", seed=4))
    reference = comfyui_extra.run(prompt("changed-new.safetensors", seed=4))
    assert again["status"]["status_str"] == "success", again["status"]
    assert np.array_equal(_image(comfyui_extra, again, "3"), _image(comfyui_extra, reference, "3"))
