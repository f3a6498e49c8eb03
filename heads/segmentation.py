"""Semantic segmentation head on multiscale features (the neck's output), in the spirit of EfficientDet's
segmentation variant: every level is brought to the finest level's resolution (stride 4 with a P2 neck),
summed, refined by a few separable convs and classified per pixel."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from backbones.contract import FeatureSpec
from layers.conv import ActLayer, ConvNorm, NormLayer, SeparableConv2d, default_norm_layer

__all__ = ["SegmentationHead", "SegmentationOutput", "upsample_logits"]


class SegmentationOutput(NamedTuple):
    """Raw per-pixel class logits at the head's output stride (``[B, C, H/s, W/s]``), and the auxiliary
    logits of a coarser level (``None`` when the head has no auxiliary branch). Same type in train and eval."""

    logits: torch.Tensor
    aux_logits: torch.Tensor | None = None


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``[B, C, h, w]`` logits to ``size`` (H, W); a no-op at that size already."""
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationHead(nn.Module):
    """Fuses the levels of ``in_specs`` at the finest one's stride and predicts ``num_classes`` logits there.

    Args:
        in_specs: the neck's ``out_specs``. Levels whose channel count differs from ``channels`` get a 1x1
            conv + norm projection, so any backbone or neck output works.
        num_classes: classes predicted per pixel.
        channels: width of the fused map; defaults to the finest level's channel count.
        depth: separable conv + norm + activation blocks after the fusion.
        levels: the levels to fuse (names such as ``"p2"``); default all of ``in_specs``.
        aux_level: a level that gets a small auxiliary classifier (deep supervision), or ``None``.
        dropout: dropout probability before the classifier.
    """

    #: Parameters whose shape depends on the class count (re-initialised when fine-tuning to other classes).
    class_specific_prefixes = ("classifier.", "aux.2.")

    def __init__(
        self,
        in_specs: Mapping[str, FeatureSpec],
        *,
        num_classes: int,
        channels: int | None = None,
        depth: int = 2,
        levels: Sequence[str] | None = None,
        aux_level: str | None = None,
        dropout: float = 0.1,
        norm_layer: NormLayer = default_norm_layer,
        act_layer: ActLayer = nn.SiLU,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        names = list(in_specs) if levels is None else [str(n) for n in levels]
        unknown = [n for n in names if n not in in_specs]
        if unknown or not names:
            raise ValueError(f"levels {unknown or names} are not among the inputs {list(in_specs)}")
        names.sort(key=lambda n: in_specs[n].stride)
        if aux_level is not None and aux_level not in in_specs:
            raise ValueError(f"aux_level {aux_level!r} is not among the inputs {list(in_specs)}")
        self.names = names
        self.num_classes = int(num_classes)
        finest = in_specs[names[0]]
        self.out_stride = finest.stride
        channels = int(channels or finest.channels)
        self.channels = channels
        self.lateral = nn.ModuleDict(
            {
                n: nn.Identity()
                if in_specs[n].channels == channels
                else ConvNorm(in_specs[n].channels, channels, norm_layer=norm_layer)
                for n in names
            }
        )
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(SeparableConv2d(channels, channels, norm_layer=norm_layer), act_layer())
                for _ in range(depth)
            )
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.aux_level = aux_level
        self.aux: nn.Module | None = None
        if aux_level is not None:
            aux_in = in_specs[aux_level].channels
            self.aux = nn.Sequential(
                SeparableConv2d(aux_in, aux_in, norm_layer=norm_layer),
                act_layer(),
                nn.Conv2d(aux_in, num_classes, 1),
            )

    def forward(self, features: Mapping[str, torch.Tensor]) -> SegmentationOutput:
        finest = features[self.names[0]]
        size = finest.shape[-2:]
        fused = self.lateral[self.names[0]](finest)
        for name in self.names[1:]:
            x = self.lateral[name](features[name])
            fused = fused + F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        logits = self.classifier(self.dropout(self.blocks(fused)))
        aux = self.aux(features[self.aux_level]) if self.aux is not None else None
        return SegmentationOutput(logits, aux)
