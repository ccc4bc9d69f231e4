"""LoadBase's single-file sources and SaveLoRA's destination where the folders are ComfyUI's: checkpoints
listed by their name in each checkpoints folder (as ComfyUI's own loader lists them) and loaded with
config "auto"; SaveLoRA writing into the loras folder so LoadLoRA lists it by its plain name. Headless
(no checkpoints folders configured) the names stay as they were, and auto works there too."""
import shutil

import pytest
import torch

from loraloom import Runtime
from loraloom.graph_runtime import Folders, ValidationError, context


@pytest.fixture
def comfy_like(tmp_path, tiny_model_files, lora_files, monkeypatch):
    """Folders as inside ComfyUI: two checkpoints folders (the models folder's and an extra one), a
    loras folder SaveLoRA writes into; the default context uses them, as ComfyUI's does."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "no-hub"))  # this machine's cache
    models, extra, loras = tmp_path / "models", tmp_path / "extra" / "ckpts", tmp_path / "loras"
    (models / "checkpoints").mkdir(parents=True)
    (extra / "sub").mkdir(parents=True)
    shutil.copytree(lora_files[0], loras)
    shutil.copy(tiny_model_files("tiny-sd15")["single_file"], extra / "sub" / "sd15.safetensors")
    shutil.copy(tiny_model_files("tiny-sdxl")["single_file"], models / "checkpoints" / "sdxl.safetensors")
    shutil.copy(tiny_model_files("tiny-flux")["single_file"], models / "checkpoints" / "flux.safetensors")
    shutil.copytree(tiny_model_files("tiny-sd15")["folder"], models / "sd15-diffusers")
    folders = Folders([loras], models, tmp_path / "out", checkpoint_dirs=[models / "checkpoints", extra],
                      lora_save_dir=loras)
    monkeypatch.setattr(context, "_default", context.ExecutionContext(folders=folders))
    rt = Runtime(folders=folders)
    rt.names = lora_files[1]
    return rt


def _sources():
    from loraloom.nodes.base import LoadBase

    return LoadBase.SCHEMA.input("source").option_list()


def _base_wf(source, config="auto"):
    return {"1": {"class_type": "LoadBase", "inputs": {"source": source, "config": config, "dtype": "fp32",
                                                       "device": "cpu"}},
            "2": {"class_type": "Sample", "inputs": {"model": ["1", 0], "prompt": "a cat", "steps": 2, "width": 64,
                                                     "height": 64, "seed": 7}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


def _errors(info, node="1"):
    """{(input, kind): details} of node ``node``'s problems (kind: the error's own, else the problem's type)."""
    return {(e["extra_info"].get("input_name"), e["extra_info"].get("kind") or e["type"]): e["details"]
            for e in info.value.node_errors[node]["errors"]}


def test_checkpoints_are_listed_by_their_name_in_each_checkpoints_folder(comfy_like):
    sources = _sources()
    assert sources[-3:] == ["flux.safetensors", "sdxl.safetensors", "sub/sd15.safetensors"], sources
    assert "sd15-diffusers" in sources and "tiny-sd15" in sources
    assert not any(s.startswith("checkpoints/") for s in sources), "ComfyUI's names, not paths in the models folder"


def test_a_listed_checkpoint_runs_with_config_auto_as_its_preset_does(comfy_like):
    from loraloom.bases.presets import PRESETS

    for source, preset in [("sub/sd15.safetensors", "tiny-sd15"), ("sdxl.safetensors", "tiny-sdxl")]:
        result = comfy_like.run(_base_wf(source))
        assert result.value("1").base.arch == PRESETS[preset].arch
        assert torch.equal(result.value("2"), comfy_like.run(_base_wf(preset)).value("2")), \
            f"{source}: same weights, same image"


def test_names_that_leave_the_folders_or_are_not_listed_are_refused(comfy_like, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(comfy_like.folders.checkpoint_dirs[0] / "sdxl.safetensors", outside)
    (comfy_like.folders.checkpoint_dirs[1] / "link.safetensors").symlink_to(outside)
    assert "link.safetensors" not in _sources(), "a symlink out of its folder is never offered"
    for name in ["../elsewhere.safetensors", "link.safetensors", "checkpoints/sdxl.safetensors", "/etc/x.safetensors"]:
        with pytest.raises(ValidationError) as info:
            comfy_like.validate(_base_wf(name))
        assert ("source", "value_not_in_list") in _errors(info), (name, _errors(info))


def test_auto_on_a_transformer_file_without_its_parts_is_refused_when_queued(comfy_like):
    with pytest.raises(ValidationError) as info:
        comfy_like.validate(_base_wf("flux.safetensors"))
    details = _errors(info)[("config", "parts_missing")]
    assert "clip_l" in details and "t5xxl" in details and "ae.safetensors" in details, details
    assert str(comfy_like.folders.models_dir / "text_encoders") in details and "Fix:" in details, details


def test_auto_on_a_foreign_file_needs_a_tokenizer_and_finds_it_in_the_models_folder(comfy_like, standard_checkpoint):
    from loraloom.bases.presets import build_tokenizer

    models = comfy_like.folders.models_dir
    pipe, _ = standard_checkpoint("sd15", models / "checkpoints" / "foreign.safetensors")
    with pytest.raises(ValidationError) as info:
        comfy_like.validate(_base_wf("foreign.safetensors"))
    details = _errors(info)[("config", "tokenizer_missing")]
    assert str(models / "tokenizers" / "clip") in details and "Fix:" in details, details
    build_tokenizer().save_pretrained(models / "tokenizers" / "clip")
    result = comfy_like.run(_base_wf("foreign.safetensors"))
    assert result.value("1").base.arch == "sd15" and result.value("2").shape == (1, 64, 64, 3)


def test_saved_loras_go_where_the_lora_loaders_list_them(comfy_like):
    from loraloom.nodes.common import list_loras

    name = comfy_like.names["tiny-sdxl/kohya"]
    save = {"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": name}},
            "2": {"class_type": "SaveLoRA", "inputs": {"lora": ["1", 0], "filename_prefix": "loras/merged"}}}
    first = comfy_like.run(save)
    text = first.outputs["2"]["text"][0]
    saved = comfy_like.folders.lora_save_dir / "merged_00001_.safetensors"
    assert saved.is_file() and text.startswith("saved merged_00001_.safetensors "), text
    assert not (comfy_like.folders.output_dir / "loras").exists(), "nothing in the output folder"
    assert "merged_00001_.safetensors" in list_loras()
    again = comfy_like.run({"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "merged_00001_.safetensors"}},
                            "2": {**save["2"], "inputs": {**save["2"]["inputs"], "filename_prefix": "again"}}})
    assert {c: set(m) for c, m in again.value("1").components.items()} == \
        {c: set(m) for c, m in first.value("1").components.items()}, "the saved LoRA loads with every module"
    # a prefix without the "loras/" folder keeps its own subfolders, inside the loras folder
    comfy_like.run({**save, "2": {**save["2"], "inputs": {**save["2"]["inputs"], "filename_prefix": "mine/x"}}})
    assert (comfy_like.folders.lora_save_dir / "mine" / "x_00001_.safetensors").is_file()
    # LoRAs an earlier version saved into the output folder keep loading by their old names
    old = comfy_like.folders.output_dir / "loras" / "old.safetensors"
    old.parent.mkdir(parents=True)
    shutil.copy(saved, old)
    assert "loras/old.safetensors [output]" in list_loras()
    comfy_like.run({"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "loras/old.safetensors [output]"}},
                    "2": {**save["2"], "inputs": {**save["2"]["inputs"], "filename_prefix": "from-old"}}})
    assert (comfy_like.folders.lora_save_dir / "from-old_00001_.safetensors").is_file()


def test_headless_single_files_keep_their_names_and_run_with_auto(tmp_path, tiny_model_files):
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_model_files("tiny-sd15")["single_file"], models / "checkpoints" / "sd15.safetensors")
    rt = Runtime(models_dir=models, output_dir=tmp_path / "out")
    got = rt.run(_base_wf("checkpoints/sd15.safetensors")).value("2")  # before: "needs a config folder"
    assert torch.equal(got, rt.run(_base_wf("tiny-sd15")).value("2"))
