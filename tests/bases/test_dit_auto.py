"""config="auto" for Flux / SD3.5 transformer files: the text encoders and VAE found in the file or by
name in ComfyUI-style folders, every config derived from a header, the pipeline built key by key.
Compared with the pipeline the files were written from: every weight and the sampled image equal."""
import shutil

import pytest
import torch

from loraloom import Runtime, fixtures
from loraloom.bases.arch import BaseModelError
from loraloom.bases.export import save_single_file
from loraloom.bases.loading import identify_base, load_base
from loraloom.graph_runtime import Folders, ValidationError

ARCHES = ("flux", "sd3")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{arch: (the pipeline, the models folder with its parts written separately)}."""
    found = {}
    for arch in ARCHES:
        pipe = fixtures.dit_parts_pipeline(arch)
        root = tmp_path_factory.mktemp(f"{arch}-parts")
        fixtures.write_dit_parts(root, arch, pipe)
        found[arch] = pipe, root
    return found


def _dirs(root):
    return {"tokenizer_dirs": [root / "tokenizers" / "clip"],
            "part_dirs": {"text_encoders": [root / "text_encoders"], "vae": [root / "vae"],
                          "t5_tokenizer": [root / "tokenizers" / "t5"]}}


def _image(pipe):
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("layout", ["separate", "all-in-one", "ours"])
@pytest.mark.parametrize("arch", ARCHES)
def test_auto_builds_the_pipeline_the_files_came_from(arch, layout, written, tmp_path):
    pipe, root = written[arch]
    if layout == "separate":
        path = root / "checkpoints" / f"{arch}-parts.safetensors"
    elif layout == "all-in-one":  # text encoders and VAE inside the checkpoint; no part folders at all
        path = fixtures.write_dit_parts(tmp_path, arch, pipe, all_in_one=True)["checkpoint"]
    else:  # our SaveCheckpoint's file: its transformer config is read from its metadata, not derived
        path = save_single_file(pipe, tmp_path / "ours.safetensors")
    dirs = _dirs(root)
    if layout == "all-in-one":
        dirs["part_dirs"] = {"t5_tokenizer": dirs["part_dirs"]["t5_tokenizer"]}
    loaded = load_base(path, dtype="fp32", device="cpu", **dirs).pipeline
    assert type(loaded) is type(pipe)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            ours, theirs = loaded.components[name].state_dict(), component.state_dict()
            assert ours.keys() == theirs.keys(), (name, sorted(set(ours) ^ set(theirs))[:5])
            unequal = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
            assert not unequal, f"{layout} {name}: {unequal[:3]} differ"
            assert type(loaded.components[name]) is type(component), name
    def scheduler(p):
        return {k: v for k, v in p.scheduler.config.items() if not k.startswith("_")}

    assert scheduler(loaded) == scheduler(pipe), "the family's scheduler"
    assert torch.equal(_image(loaded), _image(pipe)), f"{arch} {layout}: same weights, configs, tokenizers: same image"


def test_the_identity_names_every_file_and_changes_with_any_of_them(written, tmp_path):
    _, root = written["flux"]
    copy = tmp_path / "models"
    shutil.copytree(root, copy)
    path = copy / "checkpoints" / "flux-parts.safetensors"
    first = identify_base(path, dtype="fp32", device="cpu", **_dirs(copy))
    assert {component for component, _, _ in first.parts} == {"text_encoder", "text_encoder_2", "vae"}
    assert str(copy / "text_encoders" / "t5xxl_fp32.safetensors") in {file for _, file, _ in first.parts}
    clip = copy / "text_encoders" / "clip_l.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(clip)
    tensors["text_model.final_layer_norm.weight"] = tensors["text_model.final_layer_norm.weight"] + 1
    save_file(tensors, clip, {"format": "pt"})
    second = identify_base(path, dtype="fp32", device="cpu", **_dirs(copy))
    assert second.fingerprint != first.fingerprint, "a changed text encoder file is another base"


def _rewrite(path, **changes):
    """Rewrite a part file with some tensors replaced by zeros of other shapes."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    for key, shape in changes.items():
        tensors[key] = torch.zeros(shape)
    save_file(tensors, path, {"format": "pt"})


@pytest.mark.parametrize("arch, file, key, shape, said", [
    ("flux", "text_encoders/t5xxl_fp32.safetensors", "shared.weight", None,
     "the T5 encoder's width is 64, but the Flux transformer needs 128"),
    ("flux", "vae/ae.safetensors", "decoder.conv_in.weight", (32, 4, 3, 3),
     "the VAE's latent channels x 4 (Flux's 2x2 packing) is 16, but the Flux transformer needs 64"),
    ("sd3", "text_encoders/clip_g.safetensors", "text_projection.weight", (32, 64),
     "CLIP-L's and CLIP-G's projection widths together is 96, but the SD3.5 transformer needs 128"),
])
def test_a_part_that_does_not_fit_the_transformer_is_named_not_loaded(arch, file, key, shape, said, written,
                                                                       tmp_path):
    _, root = written[arch]
    copy = tmp_path / "models"
    shutil.copytree(root, copy)
    if shape is None:  # a T5 of another width: another (narrower) model's file
        other = fixtures.dit_parts_pipeline(arch).text_encoder_2
        narrow = type(other)(type(other.config)(**{**other.config.to_dict(), "d_model": 64}))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in narrow.state_dict().items() if k != "encoder.embed_tokens.weight"},
                  copy / file, {"format": "pt"})
    else:
        _rewrite(copy / file, **{key: shape})
    with pytest.raises(BaseModelError) as info:
        load_base(copy / "checkpoints" / f"{arch}-parts.safetensors", dtype="fp32", device="cpu", **_dirs(copy))
    err = info.value
    assert err.kind == "part_mismatch" and said in err.message, err.render()
    assert err.file == str(copy / file) and err.key == key, (err.file, err.key)
    assert str(err).startswith(f"{copy / file}: tensor '{key}': "), str(err)


def test_a_part_file_of_other_keys_is_refused_naming_the_key(written, tmp_path):
    _, root = written["flux"]
    copy = tmp_path / "models"
    shutil.copytree(root, copy)
    from safetensors.torch import load_file, save_file

    tensors = load_file(copy / "text_encoders" / "clip_l.safetensors")
    tensors["text_model.encoder.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, copy / "text_encoders" / "clip_l.safetensors", {"format": "pt"})
    with pytest.raises(BaseModelError, match=r"clip_l.safetensors: the CLIP text encoder file has, and the model has "
                                             r"no, weight 'encoder.layers.0.extra.weight'") as info:
        load_base(copy / "checkpoints" / "flux-parts.safetensors", dtype="fp32", device="cpu", **_dirs(copy))
    assert info.value.kind == "part_mismatch"


def _workflow(source):
    return {"1": {"class_type": "LoraLoomLoadBase", "inputs": {"source": source, "config": "auto", "dtype": "fp32",
                                                               "device": "cpu"}},
            "2": {"class_type": "LoraLoomSample", "inputs": {"model": ["1", 0], "prompt": "a cat", "steps": 2,
                                                             "width": 64, "height": 64, "seed": 7}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


def test_load_base_finds_the_parts_in_the_models_folder_and_reruns_when_one_changes(written, tmp_path):
    _, root = written["flux"]
    models = tmp_path / "models"
    shutil.copytree(root, models)
    rt = Runtime(folders=Folders([models / "loras"], models, tmp_path / "out"))
    workflow = _workflow("checkpoints/flux-parts.safetensors")
    rt.validate(workflow)
    first = rt.run(workflow)
    again = rt.run(workflow)
    assert again.executed == [], "nothing changed: nothing runs"
    _rewrite(models / "vae" / "ae.safetensors", **{"decoder.conv_out.bias": (3,)})
    changed = rt.run(workflow)
    assert sorted(changed.executed) == ["1", "2", "3"], "a changed VAE file re-runs LoadBase and what follows"
    assert not torch.equal(changed.value("2"), first.value("2")), "and its new weights are used"
    _rewrite(models / "vae" / "ae.safetensors", **{"decoder.conv_in.weight": (32, 8, 3, 3)})
    with pytest.raises(ValidationError) as info:
        rt.validate(workflow)  # refused when queued, naming the part's file and tensor, not only the checkpoint
    assert (f"input 'config': checkpoints/flux-parts.safetensors: {models / 'vae' / 'ae.safetensors'}: tensor "
            "'decoder.conv_in.weight': the VAE's latent channels x 4 (Flux's 2x2 packing) is 32") in str(info.value), \
        str(info.value)
    (models / "text_encoders" / "clip_l.safetensors").unlink()
    with pytest.raises(ValidationError, match=r"parts_missing|clip_l"):
        rt.validate(workflow)


def test_an_fp8_t5_file_is_found_and_upcast_as_it_loads(written, tmp_path):
    from safetensors.torch import load_file, save_file

    pipe, root = written["flux"]
    copy = tmp_path / "models"
    shutil.copytree(root, copy)
    fp32 = copy / "text_encoders" / "t5xxl_fp32.safetensors"
    tensors = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in load_file(fp32).items()}
    save_file(tensors, copy / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors", {"format": "pt"})
    fp32.unlink()
    loaded = load_base(copy / "checkpoints" / "flux-parts.safetensors", dtype="fp32", device="cpu", **_dirs(copy))
    ours = loaded.pipeline.text_encoder_2.state_dict()
    for key, value in tensors.items():
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], value.float()), key
    assert not torch.equal(ours["shared.weight"], pipe.text_encoder_2.state_dict()["shared.weight"]), \
        "the fp8 file's (rounded) values, not the fp32 ones"


def test_the_same_pipeline_as_a_diffusers_folder_loads_its_tied_t5_embedding_counted_once(written, tmp_path):
    # save_pretrained writes T5's input embedding once (as shared.weight); the size check counted it
    # twice and refused this folder, whose T5 is mostly that embedding
    pipe, _ = written["flux"]
    pipe.save_pretrained(tmp_path / "flux-folder", safe_serialization=True)
    loaded = load_base(tmp_path / "flux-folder", dtype="fp32", device="cpu").pipeline
    assert torch.equal(_image(loaded), _image(pipe))
