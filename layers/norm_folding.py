"""Inference-time BatchNorm folding: ``conv -> BatchNorm`` becomes one conv with a bias.

In evaluation mode a BatchNorm is a per-channel affine map ``y = (x - mean) * g / sqrt(var + eps) + b``, so it
can be merged into the convolution in front of it (weights scaled per output channel, a bias added). The
folded model computes the same function up to float rounding (about 1e-6 relative in float32) with one
memory pass less per norm.

Which conv feeds which norm is read from the module structure, never guessed from names alone:

- modules that declare ``batchnorm_fold_pairs`` (``(conv attribute, norm attribute)`` pairs applied in that
  order in ``forward``), as :class:`layers.conv.SeparableConv2d` and :class:`layers.conv.ConvNorm` do;
- the EfficientNet blocks of timm (stem, depthwise-separable, inverted-residual and edge-residual blocks),
  whose pairs are listed in :data:`TIMM_FOLD_PAIRS`;
- ``conv`` immediately followed by a norm inside an ``nn.Sequential``;
- modules with a ``fold_batchnorm_()`` method (:class:`heads.efficientdet.HeadNet`, whose conv is shared by
  levels that each have their own norm, gets one folded conv per level).

Norms anywhere else are left as they are and counted in the report.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TIMM_FOLD_PAIRS", "FoldReport", "fold_batchnorm", "fold_conv_norm", "fused_norm_replacement"]

#: ``(conv, norm)`` attribute pairs of timm's EfficientNet building blocks, by class name.
TIMM_FOLD_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "EfficientNetFeatures": (("conv_stem", "bn1"),),
    "EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),
    "ConvBnAct": (("conv", "bn1"),),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "EdgeResidual": (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
}


@dataclass(frozen=True)
class FoldReport:
    folded: int  #: norms merged into a conv
    remaining: int  #: BatchNorm modules still in the model (structures this module does not know)


def _foldable_norm(norm: nn.Module) -> bool:
    if not isinstance(norm, nn.BatchNorm2d) or norm.running_mean is None or norm.running_var is None:
        return False
    # A plain BatchNorm2d, or timm's BatchNormAct2d (norm, then dropout and activation).
    return type(norm) is nn.BatchNorm2d or (hasattr(norm, "act") and hasattr(norm, "drop"))


def fused_norm_replacement(norm: nn.BatchNorm2d) -> nn.Module:
    """What stays of ``norm`` once its affine map is in the conv: nothing, or timm's dropout + activation."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    return nn.Sequential(norm.drop, norm.act)


@torch.no_grad()
def fold_conv_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` (same class, e.g. timm's dynamic-"same"-padding conv) that also applies ``norm``'s
    evaluation-mode affine map."""
    if conv.out_channels != norm.num_features:
        raise ValueError(f"conv has {conv.out_channels} output channels, norm {norm.num_features}")
    fused = copy.deepcopy(conv)
    scale = norm.running_var.double().add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
    return fused


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> bool:
    conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
    if not isinstance(conv, nn.Conv2d) or norm is None or not _foldable_norm(norm):
        return False
    setattr(parent, conv_name, fold_conv_norm(conv, norm))
    setattr(parent, norm_name, fused_norm_replacement(norm))
    return True


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """An evaluation-mode copy of ``model`` with every BatchNorm it knows how to place merged into its conv.

    The copy is for inference only (its norms are gone); ``model`` itself is not changed.
    """
    model = copy.deepcopy(model).eval()
    folded = 0
    for module in list(model.modules()):
        if hasattr(module, "fold_batchnorm_"):
            folded += module.fold_batchnorm_()
            continue
        pairs = getattr(module, "batchnorm_fold_pairs", None) or TIMM_FOLD_PAIRS.get(type(module).__name__, ())
        for conv_name, norm_name in pairs:
            folded += _fold_pair(module, conv_name, norm_name)
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in itertools.pairwise(names):
                folded += _fold_pair(module, first, second)
    remaining = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return model, FoldReport(folded=folded, remaining=remaining)
