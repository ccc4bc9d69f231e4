"""Loading offline: presets, diffusers folders, single-file checkpoints with a config folder; round
trips are bit-identical; architecture detection; errors that say what to do."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraloom.bases import arch, export, ldm_keys, load_base, presets
from loraloom.bases.loading import LoadedBase

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# Keys real single-file checkpoints have (original LDM / SGM names; shapes differ, names do not).
REAL_SD15_KEYS = [
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.middle_block.2.emb_layers.1.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.mid.block_2.conv2.weight",
    "first_stage_model.post_quant_conv.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
]
REAL_SDXL_KEYS = [
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.6.0.op.weight",
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_out.0.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
    "first_stage_model.encoder.mid.attn_1.proj_out.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    "conditioner.embedders.1.model.positional_embedding",
    "conditioner.embedders.1.model.token_embedding.weight",
    "conditioner.embedders.1.model.text_projection",
    "conditioner.embedders.1.model.ln_final.weight",
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.out_proj.weight",
]


def _assert_same_weights(expected, actual, label):
    for name in COMPONENTS:
        a, b = getattr(expected, name, None), getattr(actual, name, None)
        if a is None and b is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), f"{label}: {name} keys differ: {sorted(set(sa) ^ set(sb))[:5]}"
        differing = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
        assert not differing, f"{label}: {name} weights differ, e.g. {differing[:3]}"


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_round_trips_are_bit_identical(name, tiny_model_files, tiny_sample):
    files = tiny_model_files(name)
    original = load_base(name, dtype="fp32", device="cpu")
    loaded = {
        "diffusers folder": load_base(files["folder"], dtype="fp32", device="cpu"),
        "single file + skeleton": load_base(files["single_file"], config=files["config"], dtype="fp32", device="cpu"),
        "single file + diffusers folder as config": load_base(files["single_file"], config=files["folder"], dtype="fp32", device="cpu"),
    }
    expected_image = tiny_sample(original.pipeline)
    for label, base in loaded.items():
        assert isinstance(base, LoadedBase)
        assert (base.arch, base.dtype, base.device) == (original.arch, torch.float32, torch.device("cpu")), label
        assert type(base.pipeline) is type(original.pipeline), f"{label}: got {type(base.pipeline).__name__}"
        _assert_same_weights(original.pipeline, base.pipeline, f"{name} via {label}")
        assert torch.equal(tiny_sample(base.pipeline), expected_image), f"{name} via {label}: output differs"


@pytest.mark.parametrize("name, real_keys", [("tiny-sd15", REAL_SD15_KEYS), ("tiny-sdxl", REAL_SDXL_KEYS)])
def test_single_file_uses_the_real_key_layout(name, real_keys, tiny_model_files):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    with safe_open(str(tiny_model_files(name)["single_file"]), framework="pt") as handle:
        keys = set(handle.keys())
        missing = [k for k in real_keys if k not in keys]
        assert not missing, f"{name}: single file lacks real checkpoint keys {missing}"
        assert handle.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1], (
            "original VAE attention weights are 1x1 convolutions"
        )
        state = {k: handle.get_tensor(k) for k in keys}
    expected = {"tiny-sd15": "v1", "tiny-sdxl": "xl_base"}[name]
    assert infer_diffusers_model_type(state) == expected, f"diffusers should read {name}'s file as {expected}"


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_config_skeleton_has_no_weights(name, tiny_model_files):
    config = tiny_model_files(name)["config"]
    names = {p.name for p in config.rglob("*") if p.is_file()}
    assert "model_index.json" in names and "config.json" in names and "tokenizer.json" in names, sorted(names)
    weights = [p for p in config.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert not weights, f"skeleton holds weights: {weights}"


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_arch_detection_everywhere(name, tiny_model_files):
    expected = presets.PRESETS[name].arch
    files = tiny_model_files(name)
    assert arch.detect_pipeline_arch(presets.build_pipeline(name, dtype="fp32", device="cpu")) == expected
    assert arch.detect_folder_arch(files["folder"]) == expected
    assert arch.detect_folder_arch(files["config"]) == expected
    assert arch.detect_file_arch(files["single_file"]) == expected


def test_fingerprints_follow_content(tiny_model_files, tmp_path):
    files = tiny_model_files("tiny-sd15")
    preset = load_base("tiny-sd15", dtype="fp32", device="cpu")
    assert preset.fingerprint == presets.PRESETS["tiny-sd15"].fingerprint
    folder = load_base(files["folder"], dtype="fp32", device="cpu")
    assert folder.fingerprint.startswith("folder:blake2b:")
    copy = shutil.copytree(files["folder"], tmp_path / "elsewhere")
    assert load_base(copy, dtype="fp32", device="cpu").fingerprint == folder.fingerprint, "same content, same fingerprint"
    scheduler = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    config["timestep_spacing"] = "trailing"
    scheduler.write_text(json.dumps(config))
    assert load_base(copy, dtype="fp32", device="cpu").fingerprint != folder.fingerprint, "a changed config must change it"
    single = load_base(files["single_file"], config=files["config"], dtype="fp32", device="cpu")
    assert single.fingerprint.startswith("single-file:blake2b:") and "+config:blake2b:" in single.fingerprint


def test_single_file_without_config_says_how_to_fix(tiny_model_files):
    path = tiny_model_files("tiny-sdxl")["single_file"]
    with pytest.raises(ValueError, match=rf"single-file checkpoint {path} needs a config folder.*Fix: pass config="):
        load_base(path, dtype="fp32", device="cpu")


def test_single_file_with_config_of_other_arch_is_refused(tiny_model_files):
    path = tiny_model_files("tiny-sd15")["single_file"]
    with pytest.raises(ValueError, match="is sd15, but config folder .* describes sdxl"):
        load_base(path, config=tiny_model_files("tiny-sdxl")["config"], dtype="fp32", device="cpu")


def test_missing_source_lists_presets(tmp_path):
    with pytest.raises(ValueError, match="neither a preset \\(tiny-sd15, tiny-sdxl\\) nor an existing file or folder"):
        load_base(str(tmp_path / "nope"))


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="only .safetensors checkpoints are loaded"):
        load_base(path)


def test_lora_file_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(path))
    with pytest.raises(ValueError, match="not a full SD/SDXL single-file checkpoint"):
        load_base(path, config=tmp_path)


def test_folder_without_model_index_says_what_is_expected(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="no model_index.json; expected a diffusers folder"):
        load_base(tmp_path)


def test_config_is_refused_for_presets_and_folders(tiny_model_files):
    with pytest.raises(ValueError, match="takes no config folder"):
        load_base("tiny-sd15", config="somewhere")
    with pytest.raises(ValueError, match="carries its own configs"):
        load_base(tiny_model_files("tiny-sd15")["folder"], config="somewhere")


def test_unsupported_architectures_are_named():
    sd2_like = dict(presets.preset_configs("tiny-sd15")["unet"], use_linear_projection=True)
    with pytest.raises(ValueError, match="SD2 uses linear projection and is not supported"):
        arch.arch_from_unet_config(sd2_like, "here")
    inpainting = dict(presets.preset_configs("tiny-sd15")["unet"], in_channels=9)
    with pytest.raises(ValueError, match="in_channels 9"):
        arch.arch_from_unet_config(inpainting, "here")
    refiner_keys = ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.positional_embedding"]
    with pytest.raises(ValueError, match="SDXL refiner"):
        arch.detect_checkpoint_arch(refiner_keys, "refiner.safetensors")


def test_pipeline_class_must_agree_with_its_unet(tiny_model_files, tmp_path):
    folder = shutil.copytree(tiny_model_files("tiny-sd15")["config"], tmp_path / "lying")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not match its sd15 UNet; expected 'StableDiffusionPipeline'"):
        arch.detect_folder_arch(folder)


def test_writers_refuse_to_overwrite(tiny_model_files, tiny_sd15):
    with pytest.raises(FileExistsError, match="already exists and is not an empty folder.*Fix:"):
        export.save_diffusers_folder(tiny_sd15, tiny_model_files("tiny-sd15")["folder"])
    with pytest.raises(FileExistsError, match="already exists.*Fix:"):
        export.save_single_file(tiny_sd15, tiny_model_files("tiny-sd15")["single_file"])


def test_unknown_keys_are_refused_not_dropped():
    with pytest.raises(ValueError, match="UNet key 'foo.weight' has no original single-file name"):
        ldm_keys.unet_to_original({"foo.weight": torch.zeros(1)}, presets.preset_configs("tiny-sd15")["unet"])


def _mapped_ranges(folder):
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith(str(folder)):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see file mappings")
def test_loaded_weights_do_not_live_in_the_mapped_file(tiny_model_files):
    folder = tiny_model_files("tiny-sdxl")["folder"]
    base = load_base(folder, dtype="fp32", device="cpu")
    # safetensors maps the file and may hand out views into it: a rewrite of the file would then
    # change a live model, and unaligned views change float results.
    ranges = _mapped_ranges(folder)
    for name in COMPONENTS:
        for key, tensor in getattr(base.pipeline, name).state_dict().items():
            pointer = tensor.data_ptr()
            assert not any(start <= pointer < end for start, end in ranges), f"{name}.{key} views the mapped file"
