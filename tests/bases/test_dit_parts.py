"""The parts of a Flux / SD3.5 pipeline besides the transformer (bases/dit_parts.py): found inside an
all-in-one checkpoint or by their usual names in ComfyUI's folders, a wrong file named, and every
missing part listed at once with where it was looked for."""
import pytest
import torch
from safetensors.torch import save_file

from loraloom.bases import dit_parts
from loraloom.bases.arch import BaseModelError


def _file(path, *keys):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


def test_flux_parts_are_found_by_name_in_order_of_the_folders(tmp_path):
    clip_dir, enc_dir, vae_dir = tmp_path / "clip", tmp_path / "text_encoders", tmp_path / "vae"
    _file(enc_dir / "clip_l.safetensors", "text_model.embeddings.token_embedding.weight")
    _file(clip_dir / "clip_l.safetensors", "text_model.embeddings.token_embedding.weight")
    _file(clip_dir / "t5xxl_fp16.safetensors", "shared.weight")
    _file(vae_dir / "ae.safetensors", "decoder.conv_in.weight")
    found = dit_parts.find_parts("flux", tmp_path / "flux1-dev.safetensors", ["double_blocks.0.img_attn.qkv.weight"],
                                 {"text_encoders": [enc_dir, clip_dir], "vae": [vae_dir]})
    assert found == {"text_encoder": dit_parts.Found(enc_dir / "clip_l.safetensors", ""),
                     "text_encoder_2": dit_parts.Found(clip_dir / "t5xxl_fp16.safetensors", ""),
                     "vae": dit_parts.Found(vae_dir / "ae.safetensors", "")}, found


def test_an_all_in_one_checkpoints_own_parts_come_first(tmp_path):
    _file(tmp_path / "vae" / "sd3.5_vae.safetensors", "decoder.conv_in.weight")
    checkpoint = tmp_path / "sd3.5_large.safetensors"
    keys = ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "first_stage_model.decoder.conv_in.weight",
            *(f"text_encoders.{n}.transformer.text_model.embeddings.token_embedding.weight" for n in ("clip_l", "clip_g")),
            "text_encoders.t5xxl.transformer.shared.weight"]
    found = dit_parts.find_parts("sd3", checkpoint, keys, {"vae": [tmp_path / "vae"]})
    assert found["vae"] == dit_parts.Found(checkpoint, "first_stage_model."), "the checkpoint's own VAE first"
    assert found["text_encoder_2"] == dit_parts.Found(checkpoint, "text_encoders.clip_g.transformer.")
    assert found["text_encoder_3"] == dit_parts.Found(checkpoint, "text_encoders.t5xxl.transformer.")


def test_every_missing_part_is_listed_with_where_it_was_looked_for(tmp_path):
    enc_dir = tmp_path / "text_encoders"
    _file(enc_dir / "clip_l.safetensors", "text_model.embeddings.token_embedding.weight")
    with pytest.raises(BaseModelError) as info:
        dit_parts.find_parts("sd3", tmp_path / "sd3.5_medium.safetensors", ["joint_blocks.0.x_block.attn.qkv.weight"],
                             {"text_encoders": [enc_dir]})
    err = info.value
    assert err.kind == "parts_missing" and err.value == ["clip_g", "t5xxl", "vae"], err.render()
    assert str(enc_dir) in err.message and "no vae folder" in err.message and "models/text_encoders" in err.fix, \
        err.render()


def test_a_file_of_the_usual_name_that_is_not_the_part_is_named(tmp_path):
    enc_dir = tmp_path / "text_encoders"
    _file(enc_dir / "clip_l.safetensors", "text_model.embeddings.token_embedding.weight")
    wrong = _file(enc_dir / "t5xxl_fp16.safetensors", "text_model.embeddings.token_embedding.weight")
    with pytest.raises(BaseModelError) as info:
        dit_parts.find_parts("flux", tmp_path / "flux.safetensors", [], {"text_encoders": [enc_dir]})
    err = info.value
    assert err.kind == "part_mismatch" and err.file == str(wrong) and err.key == "shared.weight", err.render()
