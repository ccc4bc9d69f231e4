"""Parse the dtype and device choices users type into torch values.

"auto" means cuda + fp16 when a CUDA device is usable, else cpu + fp32: fp16 matmuls on the CPU are
slow or unsupported, and fp32 on a GPU wastes half the memory for no visible gain in sampling.
"""
from __future__ import annotations

import re

import torch

from .arch import BaseModelError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def dtype_name(dtype: torch.dtype) -> str:
    """The short name ("fp32", "fp16", "bf16") of a torch dtype we support."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise BaseModelError(f"dtype {dtype} is not supported; valid choices: {', '.join(DTYPES)}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" (or a torch.device) into a torch.device.

    "auto" picks cuda when torch.cuda.is_available(), else cpu. An explicit cuda device that this
    machine does not have raises instead of silently falling back to the CPU.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise BaseModelError(
            f"device {device!r} is not a string; valid choices: {', '.join(DEVICE_CHOICES)}"
        )
    value = device.strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    match = _CUDA_INDEX.fullmatch(value)
    if value == "cuda" or match:
        if not torch.cuda.is_available():
            raise BaseModelError(
                f"device {device!r} asks for CUDA, but torch.cuda.is_available() is False on this "
                "machine.", value=device, fix="use device 'cpu' or 'auto'."
            )
        if match and int(match.group(1)) >= torch.cuda.device_count():
            raise BaseModelError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1}).", value=device,
                limit=torch.cuda.device_count() - 1, fix="pick one of those or 'auto'."
            )
        return torch.device(value)
    raise BaseModelError(
        f"device {device!r} is not valid; valid choices: {', '.join(DEVICE_CHOICES)}"
    )


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """Turn "auto", "fp32", "fp16" or "bf16" (or a supported torch.dtype) into a torch.dtype.

    "auto" gives fp16 on a cuda device and fp32 otherwise; `device` is the resolved device
    (resolve_device("auto") when None).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise BaseModelError(f"dtype {dtype} is not supported; valid choices: {', '.join(DTYPE_CHOICES)}")
        return dtype
    if not isinstance(dtype, str):
        raise BaseModelError(f"dtype {dtype!r} is not a string; valid choices: {', '.join(DTYPE_CHOICES)}")
    value = dtype.strip().lower()
    if value == "auto":
        device = resolve_device("auto") if device is None else device
        return torch.float16 if device.type == "cuda" else torch.float32
    if value in DTYPES:
        return DTYPES[value]
    raise BaseModelError(f"dtype {dtype!r} is not valid; valid choices: {', '.join(DTYPE_CHOICES)}")


def resolve(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> tuple[torch.dtype, torch.device]:
    """Resolve a (dtype, device) pair together, so "auto" dtype follows the chosen device."""
    resolved_device = resolve_device(device)
    return resolve_dtype(dtype, resolved_device), resolved_device
