"""Where a run computes and in what precision: the device a config names, and the autocast dtype for it."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from hamtune.errors import HamtuneError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HamtuneError(f"train config: device={name!r} but CUDA is not available on this machine")
    return device


def amp_dtype_for(device: torch.device, enabled: bool, cpu: bool = False) -> torch.dtype | None:
    """The autocast dtype of a run: on CUDA (`enabled`) bf16 where supported (no loss scaling needed), else fp16; on
    CPU (`cpu`) bf16, which pays only where the CPU has bf16 units and the model's kernels use them (resnet10t at
    64 px: 1.56x; EfficientNet-Lite's depthwise convolutions: slower; BENCHMARKS.md); None = float32."""
    if device.type == "cuda" and enabled:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu:
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or nothing when the run computes in float32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
