"""Small building blocks shared by necks and heads."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "PAD_MODES",
    "ActLayer",
    "ConvNorm",
    "MaxPoolDown",
    "NormLayer",
    "SeparableConv2d",
    "activation_layer",
    "default_norm_layer",
]

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]

#: BatchNorm settings of the EfficientDet paper (TensorFlow's momentum 0.99 is PyTorch's 0.01).
default_norm_layer: NormLayer = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)

#: Activations of the neck and head by name: SiLU (swish) for EfficientDet D0-D7x, ReLU6 for EfficientDet-Lite
#: (bounded, so it quantizes well).
ACTIVATIONS: dict[str, ActLayer] = {"silu": nn.SiLU, "relu6": nn.ReLU6}


def activation_layer(name: str) -> ActLayer:
    """The activation layer type called ``name`` in :data:`ACTIVATIONS` (a config's way to pick ``act_layer``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


#: "native": symmetric PyTorch padding; "same": TensorFlow "SAME" padding (asymmetric for stride 2),
#: needed to reproduce models trained in TensorFlow.
PAD_MODES = ("native", "same")


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 (or k x k) followed by pointwise 1x1, optionally followed by a norm layer.

    Stride is always 1 here, where "same" and symmetric padding coincide, so one padding serves both modes.
    """

    #: ``pointwise`` feeds ``norm`` (see :func:`layers.norm_folding.fold_batchnorm`).
    batchnorm_fold_pairs = (("pointwise", "norm"),)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        bias: bool = False,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.pointwise(self.depthwise(x)))


class ConvNorm(nn.Module):
    """1x1 convolution (no bias) + norm: changes the channel count of a feature map."""

    batchnorm_fold_pairs = (("conv", "norm"),)

    def __init__(self, in_channels: int, out_channels: int, *, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = norm_layer(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class MaxPoolDown(nn.Module):
    """3x3 stride-2 max pooling that halves a map (output ``ceil(H / 2)``) in either padding mode."""

    def __init__(self, pad_mode: str = "native") -> None:
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_mode == "native":
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        h, w = x.shape[-2:]
        pad_h = max((math.ceil(h / 2) - 1) * 2 + 3 - h, 0)
        pad_w = max((math.ceil(w / 2) - 1) * 2 + 3 - w, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=float("-inf"))
        return F.max_pool2d(x, kernel_size=3, stride=2)

    def extra_repr(self) -> str:
        return f"pad_mode={self.pad_mode!r}"
