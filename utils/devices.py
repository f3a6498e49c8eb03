"""What the current machine's accelerator can do."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["native_bf16_cuda"]


def native_bf16_cuda(device: torch.device | str | None = None) -> bool:
    """Whether the CUDA GPU ``device`` (default: the current one) computes in bfloat16 natively (compute capability
    8.0+). Older GPUs emulate it, slower than float32, so ``"auto"`` precisions (inference and training) only pick
    bf16 where it is native."""
    if not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else None
    with torch.cuda.device(device) if device is not None and device.index is not None else contextlib.nullcontext():
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before the argument existed: emulation was not counted
            return torch.cuda.is_bf16_supported()
