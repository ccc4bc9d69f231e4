"""dtype and device choices: "auto", explicit names, and errors that list the valid choices."""
import pytest
import torch

from loraloom.bases import devices, load_base


@pytest.mark.parametrize("text, expected", [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16), (" BF16 ", torch.bfloat16), (torch.float16, torch.float16)])
def test_explicit_dtypes(text, expected):
    assert devices.resolve_dtype(text) == expected, f"{text!r} should mean {expected}"


@pytest.mark.parametrize("text, expected", [("cpu", torch.device("cpu")), ("CPU", torch.device("cpu")), (torch.device("cpu"), torch.device("cpu"))])
def test_explicit_devices(text, expected):
    assert devices.resolve_device(text) == expected


def test_auto_follows_cuda_availability():
    dtype, device = devices.resolve("auto", "auto")
    if torch.cuda.is_available():
        assert (dtype, device.type) == (torch.float16, "cuda"), "auto on a CUDA machine is cuda + fp16"
    else:
        assert (dtype, device) == (torch.float32, torch.device("cpu")), "auto without CUDA is cpu + fp32"


def test_auto_dtype_follows_an_explicit_cpu_device():
    assert devices.resolve("auto", "cpu") == (torch.float32, torch.device("cpu")), "fp16 on the CPU would be slow"


@pytest.mark.parametrize("bad", ["fp8", "float32", "", "half", 16, torch.int8])
def test_bad_dtype_lists_valid_choices(bad):
    with pytest.raises(ValueError, match="valid choices: auto, fp32, fp16, bf16"):
        devices.resolve_dtype(bad)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "mps", "", 0])
def test_bad_device_lists_valid_choices(bad):
    with pytest.raises(ValueError, match="valid choices: auto, cpu, cuda, cuda:N"):
        devices.resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_says_so(device):
    with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is False.*Fix: use device 'cpu' or 'auto'"):
        devices.resolve_device(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_out_of_range_names_the_devices():
    with pytest.raises(ValueError, match="CUDA device"):
        devices.resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_dtype_name_round_trips():
    for name, dtype in devices.DTYPES.items():
        assert devices.dtype_name(dtype) == name


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_load_base_casts_every_component(dtype):
    base = load_base("tiny-sdxl", dtype=dtype, device="cpu")
    expected = devices.DTYPES[dtype]
    assert base.dtype == expected and base.dtype_name == dtype
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got = getattr(base.pipeline, name).dtype
        assert got == expected, f"{name} is {got}, asked for {expected}"


def test_load_base_rejects_bad_values_before_building():
    with pytest.raises(ValueError, match="dtype 'fp64' is not valid"):
        load_base("tiny-sd15", dtype="fp64")
    with pytest.raises(ValueError, match="device 'tpu' is not valid"):
        load_base("tiny-sd15", device="tpu")
