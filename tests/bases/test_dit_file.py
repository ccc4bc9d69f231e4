"""Flux and SD3.5 single-file checkpoints (bases/dit_file.py, load_base): a transformer in the
original layout (BFL names bare as flux1-dev.safetensors ships them, or under ComfyUI's
``model.diffusion_model.``; SD3's MMDiT names) is written and read back bit-exact, agrees key for key
and bit for bit with diffusers' own converters, and every check of the SD/SDXL single-file path
applies; a file of another architecture, a damaged one or a config that does not fit is refused."""
import json
import shutil

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import load_file, save_file

from loraloom.bases import arch, dit_file, export, load_base, presets
from loraloom.bases.arch import BaseModelError

DIT_PRESETS = presets.preset_names("transformer")
MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")

# Every key of block 0 and the top level in the real flux1-dev.safetensors (names as Black Forest
# Labs ships them; the same names diffusers' converter pops).
REAL_FLUX_KEYS = {
    *(f"double_blocks.0.{stream}_{part}" for stream in ("img", "txt") for part in (
        "attn.norm.key_norm.scale", "attn.norm.query_norm.scale", "attn.proj.bias", "attn.proj.weight",
        "attn.qkv.bias", "attn.qkv.weight", "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight",
        "mod.lin.bias", "mod.lin.weight")),
    *(f"single_blocks.0.{part}" for part in (
        "linear1.bias", "linear1.weight", "linear2.bias", "linear2.weight", "modulation.lin.bias",
        "modulation.lin.weight", "norm.key_norm.scale", "norm.query_norm.scale")),
    *(f"{module}.{p}" for module in (
        "final_layer.adaLN_modulation.1", "final_layer.linear", "guidance_in.in_layer", "guidance_in.out_layer",
        "img_in", "time_in.in_layer", "time_in.out_layer", "txt_in", "vector_in.in_layer", "vector_in.out_layer")
      for p in ("weight", "bias")),
}


def _same(expected, actual, label):
    for name in MODULES:
        a, b = getattr(expected, name, None), getattr(actual, name, None)
        if a is None and b is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), f"{label} {name}: {sorted(set(sa) ^ set(sb))[:5]}"
        differ = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
        assert not differ, f"{label} {name}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def _without_transformer_weights(folder, tmp_path):
    """A copy of a diffusers folder without the transformer's weights: what people keep beside a
    downloaded flux1-dev.safetensors (text encoders, tokenizers, VAE, configs)."""
    copy = shutil.copytree(folder, tmp_path / "config")
    for path in (copy / "transformer").glob("*.safetensors"):
        path.unlink()
    return copy


def _refused(*args, **kwargs) -> BaseModelError:
    with pytest.raises(BaseModelError) as info:
        load_base(*args, dtype="fp32", device="cpu", **kwargs)
    return info.value


@pytest.mark.parametrize("layout", ["bare", "comfyui"])
@pytest.mark.parametrize("name", DIT_PRESETS)
def test_single_file_loads_back_bit_exact(name, layout, tiny_model_files, tiny_pipeline, tmp_path):
    files = tiny_model_files(name)
    path = files["single_file"]
    if layout == "comfyui":
        path = tmp_path / "comfy.safetensors"
        save_file({f"model.diffusion_model.{k}": v for k, v in load_file(files["single_file"]).items()}, path)
    config = _without_transformer_weights(files["folder"], tmp_path)
    loaded = load_base(path, config=config, dtype="fp32", device="cpu")
    assert loaded.arch == presets.PRESETS[name].arch and arch.detect_file_arch(path) == loaded.arch
    assert loaded.fingerprint.startswith("single-file:sha256:") and "+config:sha256:" in loaded.fingerprint
    _same(tiny_pipeline(name), loaded.pipeline, f"{name} {layout}")
    # No weight may view a mapped file (a rewrite of the file would change the live model).
    roots = (str(tmp_path), str(files["single_file"]))
    with open("/proc/self/maps") as maps:
        ranges = [tuple(int(x, 16) for x in f[0].split("-")) for f in map(str.split, maps)
                  if len(f) >= 6 and f[5].startswith(roots)]
    views = [f"{c}.{k}" for c in MODULES if getattr(loaded.pipeline, c, None) is not None
             for k, t in getattr(loaded.pipeline, c).state_dict().items() if any(a <= t.data_ptr() < b for a, b in ranges)]
    assert not views, f"{len(views)} weights view a mapped file, e.g. {views[:3]}"


def test_flux_file_has_the_real_key_names_and_fused_rows(tiny_model_files, tiny_pipeline):
    tensors = load_file(tiny_model_files("tiny-flux")["single_file"])
    assert {k for k in tensors if k.startswith(("double_blocks.0.", "single_blocks.0.")) or "blocks." not in k} \
        == REAL_FLUX_KEYS
    assert sum(k.startswith("double_blocks.") and k.endswith("qkv.weight") for k in tensors) == 2 * 19
    assert sum(k.startswith("single_blocks.") and k.endswith("linear1.weight") for k in tensors) == 38
    state = tiny_pipeline("tiny-flux").transformer.state_dict()
    block = "single_transformer_blocks.7."
    assert torch.equal(tensors["single_blocks.7.linear1.weight"], torch.cat(
        [state[block + p] for p in ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight", "proj_mlp.weight")]))


def test_flux_layout_agrees_with_diffusers_converter(tiny_pipeline):
    """diffusers' converter splits linear1 at the real width (3072) whatever the file's width, so
    its single block here is at the real height (int8, 66 MB); the rest is tiny-flux's."""
    original = dit_file.to_original(tiny_pipeline("tiny-flux").transformer.state_dict(), "flux")
    checkpoint = {k: v for k, v in original.items() if not k.startswith("single_blocks.")}
    generator = torch.Generator().manual_seed(0)
    real = {"linear1.weight": (21504, 3072), "linear1.bias": (21504,), "linear2.weight": (3072, 15360),
            "linear2.bias": (3072,), "modulation.lin.weight": (9216, 3072), "modulation.lin.bias": (9216,),
            "norm.query_norm.scale": (128,), "norm.key_norm.scale": (128,)}
    for part, shape in real.items():
        checkpoint[f"single_blocks.0.{part}"] = torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)
    ours = dit_file.to_diffusers(checkpoint, "flux", "x.safetensors")
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))[:5]
    assert not [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert dit_file.to_original(ours, "flux").keys() == checkpoint.keys()
    assert all(torch.equal(v, checkpoint[k]) for k, v in dit_file.to_original(ours, "flux").items())


def test_sd3_file_reads_in_diffusers_bit_exact(tiny_model_files, tiny_pipeline):
    from diffusers import SD3Transformer2DModel

    files = tiny_model_files("tiny-sd3")
    state = tiny_pipeline("tiny-sd3").transformer.state_dict()
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(load_file(files["single_file"]))
    assert theirs.keys() == state.keys() and all(torch.equal(theirs[k], state[k]) for k in state)
    model = SD3Transformer2DModel.from_single_file(str(files["single_file"]), config=str(files["config"]),
                                                   subfolder="transformer", local_files_only=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", DIT_PRESETS)
def test_save_checkpoint_writes_what_loads(name, tiny_pipeline, tmp_path):
    path = export.save_single_file(tiny_pipeline(name), tmp_path / "x.safetensors")
    assert arch.detect_file_arch(path) == presets.PRESETS[name].arch


def test_file_of_another_arch_is_refused(tiny_model_files, tmp_path):
    flux, sd3 = tiny_model_files("tiny-flux"), tiny_model_files("tiny-sd3")
    err = _refused(flux["single_file"], config=sd3["folder"])
    assert "is flux, but config folder" in str(err) and (err.value, err.limit) == ("sd3", "flux"), err.fields()
    err = _refused(tiny_model_files("tiny-sdxl")["single_file"], config=flux["folder"])
    assert (err.value, err.limit) == ("flux", "sdxl"), err.fields()


@pytest.mark.parametrize("damage", ["truncated", "nan", "missing key", "extra key", "vae inside", "other width"])
def test_damaged_flux_file_is_refused_naming_what(damage, tiny_model_files, tmp_path):
    files = tiny_model_files("tiny-flux")
    path = tmp_path / "flux.safetensors"
    tensors = load_file(files["single_file"])
    if damage == "truncated":
        path.write_bytes(files["single_file"].read_bytes()[:-1000])
    else:
        if damage == "nan":
            tensors["double_blocks.3.img_attn.qkv.weight"][0, 0] = float("nan")
        elif damage == "missing key":
            del tensors["single_blocks.5.norm.key_norm.scale"]
        elif damage == "extra key":
            tensors["double_blocks.0.img_attn.lora_up.weight"] = torch.zeros(1)
        elif damage == "vae inside":
            tensors["vae.decoder.conv_in.weight"] = torch.zeros(1)
        else:
            tensors["double_blocks.0.img_mlp.0.weight"] = torch.zeros(7, 32)
        save_file(tensors, path)
    err = _refused(path, config=files["folder"])
    assert err.file == str(path), err.fields()
    if damage == "nan":
        assert err.key == "double_blocks.3.img_attn.qkv.weight", err.fields()
    elif damage == "missing key":
        assert err.key == "single_transformer_blocks.5.attn.norm_k.weight" and "lacks" in str(err), str(err)
    elif damage == "extra key":
        assert err.key == "double_blocks.0.img_attn.lora_up.weight" and "refused rather than dropped" in str(err), \
            str(err)
    elif damage == "vae inside":
        assert err.key == "vae.decoder.conv_in.weight" and "holds VAE weights besides the transformer" in str(err), \
            str(err)
    elif damage == "other width":
        assert err.key == "transformer_blocks.0.ff.net.0.proj.weight" and err.value == [7, 32], err.fields()


def test_flux_file_needs_its_text_encoders_from_files_or_a_config_folder(tiny_model_files):
    files = tiny_model_files("tiny-flux")
    err = _refused(files["single_file"])  # config "auto", and no part in any folder
    assert err.kind == "parts_missing" and "holds the Flux transformer" in str(err), str(err)
    assert "or choose a config folder" in err.fix, err.fix
    assert str(err).count(str(files["single_file"])) == 1, str(err)
    err = _refused(files["single_file"], config=files["config"])  # a skeleton: no text encoder weights
    assert err.kind == "not_found" and "no weights" in str(err), err.fields()


def test_flux_config_asking_more_than_the_file_holds_is_refused(tiny_model_files, tmp_path):
    files = tiny_model_files("tiny-flux")
    config = shutil.copytree(files["folder"], tmp_path / "config")
    path = config / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_attention_heads": 8}))
    err = _refused(files["single_file"], config=config)
    assert err.kind == "config_mismatch" and err.value > err.limit, err.fields()
