"""Shared tiny-model fixtures for the whole test suite.

Tests mutate pipelines (load_lora_weights, set_adapters, fuse_lora), so the pipeline fixtures are
function-scoped factories that build a fresh pipeline per call (0.05-0.15 s). Session-scoped
fixtures below hand out files only: treat those folders as read-only.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

import pytest
import torch

from loraloom.bases import presets
from loraloom.fixtures import write_fixtures
from loraloom.lora.canonical import delta
from loraloom.lora.match import base_spec

# The disk cache of merge results is off for the suite (each test starts from nothing, and no test
# writes into the user's ~/.cache), also in the processes tests start; tests of the disk cache turn it
# on in a folder of their own. The folder is set too, so a test that turns only the budget on still
# writes into a temp folder.
os.environ["LORALOOM_DISK_CACHE_BYTES"] = "0"
os.environ["LORALOOM_DISK_CACHE_DIR"] = tempfile.mkdtemp(prefix="loraloom-test-disk-cache-")
atexit.register(shutil.rmtree, os.environ["LORALOOM_DISK_CACHE_DIR"], True)

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP workers
# spinning against other processes made a 64 px sample 10-100x slower (0.2 s -> 2-28 s).
torch.set_num_threads(1)

PRESET_NAMES = tuple(presets.PRESETS)


@pytest.fixture(scope="session", autouse=True)
def _inductor_cache(tmp_path_factory):
    """torch.compile in tests, and in the processes they start, writes its cache into a folder of this
    session, never into the user's (LoRA Loom's default, ~/.cache/loraloom/inductor, or torch's)."""
    from loraloom.graph_runtime import paths

    folder = str(tmp_path_factory.mktemp("inductor"))
    patch = pytest.MonkeyPatch()
    patch.setenv("TORCHINDUCTOR_CACHE_DIR", folder)
    patch.setattr(paths, "INDUCTOR_CACHE_AT_IMPORT", folder)  # read as loraloom was imported, before this
    yield
    patch.undo()


@pytest.fixture
def tiny_pipeline():
    """Factory: `tiny_pipeline("tiny-sd15" | "tiny-sdxl", dtype="fp32", device="cpu")` -> a fresh
    diffusers pipeline, bit-identical on every call and independent of the global RNG."""

    def build(name: str = "tiny-sd15", dtype: str = "fp32", device: str = "cpu"):
        return presets.build_pipeline(name, dtype=dtype, device=device)

    return build


@pytest.fixture
def tiny_sd15(tiny_pipeline):
    """A fresh tiny-sd15 StableDiffusionPipeline (fp32, cpu)."""
    return tiny_pipeline("tiny-sd15")


@pytest.fixture
def tiny_sdxl(tiny_pipeline):
    """A fresh tiny-sdxl StableDiffusionXLPipeline (fp32, cpu)."""
    return tiny_pipeline("tiny-sdxl")


@pytest.fixture(params=PRESET_NAMES)
def tiny_any(request, tiny_pipeline):
    """A fresh tiny pipeline of each preset in turn; `request.param` is the preset name."""
    return tiny_pipeline(request.param)


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory):
    """Factory: `tiny_model_files(preset name)` -> dict of paths to that preset written as a
    diffusers folder ("folder"), its config skeleton ("config") and a single-file checkpoint in the
    original layout ("single_file": the whole SD/SGM pipeline; a Flux / SD3.5 transformer alone).
    Written once per session; read-only."""
    from loraloom.bases import export

    written: dict[str, dict[str, object]] = {}

    def files(name: str = "tiny-sd15") -> dict[str, object]:
        if name not in written:
            root = tmp_path_factory.mktemp(name)
            pipe = presets.build_pipeline(name, dtype="fp32", device="cpu")
            written[name] = {
                "folder": export.save_diffusers_folder(pipe, root / f"{name}-diffusers"),
                "config": export.save_config_skeleton(pipe, root / f"{name}-config"),
            }
            written[name]["single_file"] = export.save_single_file(pipe, root / f"{name}.safetensors")
        return dict(written[name])

    return files


@pytest.fixture
def tiny_sample():
    """Function: `tiny_sample(pipe, prompt="a cat", steps=4, size=64, seed=0)` -> image tensor
    [1, 3, size, size] in 0..1, sampled with a local generator (the global RNG is not used)."""
    def sample(pipe, prompt: str = "a cat", steps: int = 4, size: int = 64, seed: int = 0):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return pipe(
            prompt, num_inference_steps=steps, height=size, width=size, generator=generator, output_type="pt"
        ).images

    return sample


# LoRA fixture files and sampling helpers: the lora/ tests and bases/test_adapters.py use them.


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory):
    """{"<preset>/<format>": path} of every fixture LoRA; read-only. (tests/nodes has its own
    `lora_files`, the same files as a (root, relative names) pair for a Runtime's folders.)"""
    return write_fixtures(tmp_path_factory.mktemp("lora-fixtures"), presets=presets.preset_names("unet"))


@pytest.fixture
def peft_dare_state(monkeypatch):
    """A list that receives torch's global RNG state at peft's first DARE draw (merge_utils'
    random_pruning) in this test: restored before a merge with seed=None, our DARE draws peft's masks.
    Clear it before each add_weighted_adapter whose draws you want."""
    import peft.utils.merge_utils as peft_merge_utils

    captured: list[torch.Tensor] = []
    original = peft_merge_utils.random_pruning

    def spy(tensor, density, rescale):
        if not captured:
            captured.append(torch.get_rng_state())
        return original(tensor, density, rescale)

    monkeypatch.setattr(peft_merge_utils, "random_pruning", spy)
    return captured


@pytest.fixture(scope="session", autouse=True)
def _quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="peft")
        yield
    diffusers_logging.set_verbosity(level)


@pytest.fixture(scope="session")
def sample():
    """sample(pipe) -> latents after 2 Euler steps at 64 px, fixed prompt and seed (no CFG)."""

    def run(pipe) -> torch.Tensor:
        with torch.no_grad():
            return pipe(
                prompt="a photo of a cat",
                num_inference_steps=2,
                guidance_scale=1.0,
                height=64,
                width=64,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            ).images

    return run


@pytest.fixture(scope="session")
def hand_merge():
    """hand_merge(pipe, lora) adds W += delta(module) to every targeted weight of `pipe`, in place."""

    def merge(pipe, lora):
        spec = base_spec(pipe)
        with torch.no_grad():
            for component, path, module in lora.modules():
                layer = getattr(pipe, component).get_submodule(spec.model_name(component, path))
                layer.weight += delta(module, tuple(layer.weight.shape)).to(layer.weight.dtype)
        return pipe

    return merge


@pytest.fixture(scope="session")
def base_sample(sample):
    """base_sample(preset) -> sample() of the untouched preset, computed once per session."""
    from loraloom.bases.presets import build_pipeline

    cache: dict[str, torch.Tensor] = {}

    def get(preset: str) -> torch.Tensor:
        if preset not in cache:
            cache[preset] = sample(build_pipeline(preset, dtype="fp32", device="cpu"))
        return cache[preset]

    return get


# Flux / SD3.5: a diffusers-format LoRA on the preset's transformer, written by diffusers itself.

DIT_LORA_TARGETS = {
    # the attention and MLP linears diffusers-format Flux / SD3 LoRAs train (AI-Toolkit, SimpleTuner)
    "tiny-flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                  "ff.net.2", "ff_context.net.2", "proj_mlp", "proj_out"],
    "tiny-sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.2"],
}
DIT_LORA_RANK, DIT_LORA_ALPHA = 4, 8.0


@pytest.fixture(scope="session")
def dit_lora(tmp_path_factory):
    """Factory: `dit_lora("tiny-flux" | "tiny-sd3")` -> (path, LoRA): a LoRA file on the preset's
    transformer written by diffusers' save_lora_weights from peft's own init (init_lora_weights=False:
    both factors random, drawn under a fixed seed; alpha 8 at rank 4, in the adapter metadata), and
    the same LoRA as our canonical value (built from the file's tensors: "transformer.<path>.lora_A/B")."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from loraloom.lora.canonical import LoRA, LoRAModule

    made: dict[str, tuple] = {}

    def make(preset: str):
        if preset not in made:
            folder = tmp_path_factory.mktemp(f"{preset}-lora")
            pipe = presets.build_pipeline(preset, dtype="fp32", device="cpu")
            config = LoraConfig(r=DIT_LORA_RANK, lora_alpha=DIT_LORA_ALPHA, target_modules=DIT_LORA_TARGETS[preset],
                                init_lora_weights=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(7)
                pipe.transformer.add_adapter(config)
            type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                         transformer_lora_adapter_metadata=config.to_dict())
            path = folder / "pytorch_lora_weights.safetensors"
            tensors = load_file(str(path))
            modules = {
                key.removeprefix("transformer.").removesuffix(".lora_A.weight"): LoRAModule(
                    tensors[key], tensors[key.replace("lora_A", "lora_B")], DIT_LORA_ALPHA, key=key)
                for key in tensors if key.endswith(".lora_A.weight")
            }
            made[preset] = (path, LoRA({"transformer": modules}, "diffusers", fingerprint=f"test:{preset}-lora"))
        return made[preset]

    return make


@pytest.fixture
def diffusers_with_lora():
    """Function: `diffusers_with_lora(preset, path, weight, fuse=False)` -> the preset with the LoRA file
    loaded by diffusers' own load_lora_weights, at `weight` (set_adapters), fused if asked (fuse_lora)."""
    def load(preset: str, path, weight: float, fuse: bool = False):
        pipe = presets.build_pipeline(preset, dtype="fp32", device="cpu")
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
        pipe.set_adapters(["x"], [weight])
        if fuse:
            pipe.fuse_lora(components=["transformer"], adapter_names=["x"])
        return pipe

    return load


@pytest.fixture(scope="session")
def flux():
    """A tiny FluxTransformer2DModel with Flux's real block counts (19 double, 38 single; hidden 16,
    guidance embedding as in dev); read-only (deepcopy it to load adapters)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=19, num_single_layers=38, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


@pytest.fixture(scope="session")
def sd3():
    """A tiny SD3Transformer2DModel with SD3.5 large's 38 joint blocks (hidden 16); read-only."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=38, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    ).eval()  # fmt: skip


@pytest.fixture(scope="session")
def text_encoders():
    """Tiny CLIP-L-like and T5-like text encoders (hidden 16, 12 and 2 layers); read-only."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=12, vocab_size=100, projection_dim=16))  # fmt: skip
    t5 = T5EncoderModel(T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, vocab_size=100,
                                 feed_forward_proj="gated-gelu"))  # fmt: skip
    return clip.eval(), t5.eval()


@pytest.fixture(scope="session")
def dit_pipelines():
    """{"tiny-flux" | "tiny-sd3": pipeline} of the DiT presets, built once; read-only (deepcopy a
    component to load adapters into it)."""
    return {name: presets.build_pipeline(name, dtype="fp32", device="cpu") for name in presets.preset_names("transformer")}


@pytest.fixture(scope="session")
def dit_files(tmp_path_factory, dit_pipelines):
    """{"tiny-flux/<format>" | "tiny-sd3/<format>": path} of the DiT fixture LoRAs, on the presets'
    own modules (what `loraloom fixtures` writes for them); read-only."""
    from loraloom.fixtures import write_dit_fixtures

    out = tmp_path_factory.mktemp("dit-fixtures")
    files = {}
    for name, pipe in dit_pipelines.items():
        spec = base_spec(pipe)
        files.update(write_dit_fixtures(out, spec, spec.arch, name))
    return files


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance for the tests of the Ray executor, started once: two CPUs, so two one-CPU
    worker actors; a small object store. Skips where Ray is not installed (the optional extra [ray])."""
    ray = pytest.importorskip("ray", reason="Ray is not installed here (pip install 'loraloom[ray]')")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _standard_pipeline(arch: str, vocab_size: int):
    """A small pipeline whose every value shapes cannot tell is its family's (heads, groups,
    activations, token ids, scheduler): what config "auto" derives for a file without our metadata."""
    import diffusers
    import transformers

    from loraloom.bases import auto_config

    text = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 1, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "projection_dim": 64, **auto_config.CLIP_TOKEN_IDS}
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 32, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, layers_per_block=1,
                                  sample_size=auto_config.FAMILY[arch]["vae_sample_size"],
                                  scaling_factor=auto_config.FAMILY[arch]["scaling_factor"])
    scheduler = diffusers.EulerDiscreteScheduler.from_config(auto_config.SCHEDULER)
    if arch == "sd15":
        unet = diffusers.UNet2DConditionModel(
            sample_size=64, block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=64,
            attention_head_dim=8, norm_num_groups=32)
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)),
            tokenizer=presets.build_tokenizer(), unet=unet, scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    text_2 = {**text, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "hidden_act": "gelu",
              "projection_dim": 64}
    unet = diffusers.UNet2DConditionModel(
        sample_size=128, block_out_channels=[64, 64, 128], layers_per_block=1, cross_attention_dim=192,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[1, 1, 2],
        transformer_layers_per_block=[1, 1, 2], use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 64, norm_num_groups=32,
        upcast_attention=None)
    return diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)),
        text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text_2)),
        tokenizer=presets.build_tokenizer(), tokenizer_2=presets.build_tokenizer("!"), unet=unet, scheduler=scheduler)


@pytest.fixture(scope="session")
def standard_checkpoint():
    """Function: ``standard_checkpoint(arch, path, vocab_size=<the tiny vocabulary>)`` -> (pipeline,
    path): a small SD1.5 / SDXL pipeline (seeded) whose every value that shapes cannot tell is its
    family's (heads, GroupNorm groups, activations, token ids, scheduler), written to ``path`` as
    another program would write it: the original layout, no configs recorded (what config "auto"
    derives from shapes). ``vocab_size`` 49408 fits the real CLIP tokenizer."""
    from safetensors.torch import save_file

    from loraloom.bases import ldm_keys

    def write(arch: str, path, vocab_size: int = len(presets._VOCAB)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe = _standard_pipeline(arch, vocab_size)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()
        pipe.set_progress_bar_config(disable=True)
        save_file(ldm_keys.pipeline_to_original(pipe, arch), str(path), metadata={"format": "pt"})
        return pipe, path

    return write
