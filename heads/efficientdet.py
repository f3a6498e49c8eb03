"""EfficientDet class and box prediction networks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from backbones.contract import FeatureSpec
from layers.conv import ActLayer, NormLayer, SeparableConv2d, default_norm_layer

__all__ = ["DetectionOutput", "EfficientDetHead", "HeadNet", "flatten_levels"]


class DetectionOutput(NamedTuple):
    """Raw per-level predictions: ``cls_logits[name]`` is ``[B, A*C, H, W]``, ``box_deltas[name]`` ``[B, A*4, H, W]``."""

    cls_logits: dict[str, torch.Tensor]
    box_deltas: dict[str, torch.Tensor]


class HeadNet(nn.Module):
    """A stack of separable convs whose weights are shared across levels, with one norm layer per level.

    Args:
        in_specs: the neck's ``out_specs`` (all levels must have the same channel count).
        out_channels: channels of the final prediction conv (anchors x values per anchor).
        depth: number of conv + norm + activation repeats before the prediction conv.
        bias_init: constant for the prediction conv's bias.
    """

    def __init__(
        self,
        in_specs: Mapping[str, FeatureSpec],
        *,
        out_channels: int,
        depth: int,
        bias_init: float = 0.0,
        norm_layer: NormLayer = default_norm_layer,
        act_layer: ActLayer = nn.SiLU,
    ) -> None:
        super().__init__()
        widths = {s.channels for s in in_specs.values()}
        if len(widths) != 1:
            raise ValueError(f"head inputs must share one channel count, got {sorted(widths)}")
        channels = widths.pop()
        self.names = list(in_specs)
        self.convs = nn.ModuleList(SeparableConv2d(channels, channels) for _ in range(depth))
        self.norms = nn.ModuleList(
            nn.ModuleList(norm_layer(channels) for _ in self.names) for _ in range(depth)
        )
        self.act = act_layer()
        self.predict = SeparableConv2d(channels, out_channels, bias=True)
        nn.init.constant_(self.predict.pointwise.bias, bias_init)
        #: Per level, the convs with that level's norms folded in (inference only; see fold_batchnorm_).
        self.folded: nn.ModuleList | None = None

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for li, name in enumerate(self.names):
            x = features[name]
            if self.folded is not None:
                for conv in self.folded[li]:
                    x = self.act(conv(x))
            else:
                for conv, norms in zip(self.convs, self.norms):
                    x = self.act(norms[li](conv(x)))
            out[name] = self.predict(x)
        return out

    @torch.no_grad()
    def fold_batchnorm_(self) -> int:
        """Inference only: give every level its own copy of the shared pointwise convs with that level's norm
        folded in (depthwise convs stay shared). Returns the number of norms folded."""
        from layers.norm_folding import fold_conv_norm

        if self.folded is not None:
            return 0
        self.folded = nn.ModuleList(
            nn.ModuleList(
                nn.Sequential(conv.depthwise, fold_conv_norm(conv.pointwise, norms[li]))
                for conv, norms in zip(self.convs, self.norms)
            )
            for li in range(len(self.names))
        )
        del self.convs, self.norms
        self.convs, self.norms = None, None
        return len(self.names) * len(self.folded[0])


class EfficientDetHead(nn.Module):
    """Class and box networks of EfficientDet.

    Returns a :class:`DetectionOutput` (raw logits and box deltas per level) in training and evaluation.
    Channel ``a * num_classes + k`` of a class map is the logit of class ``k`` for anchor ``a``;
    channel ``a * 4 + j`` of a box map is delta ``j`` (dx, dy, dw, dh) of anchor ``a``.
    """

    #: Parameters whose shape depends on the class count (re-initialised when fine-tuning to other classes).
    class_specific_prefixes = ("class_net.predict.",)

    def __init__(
        self,
        in_specs: Mapping[str, FeatureSpec],
        *,
        num_classes: int,
        num_anchors: int = 9,
        depth: int = 3,
        prior_prob: float = 0.01,
        norm_layer: NormLayer = default_norm_layer,
        act_layer: ActLayer = nn.SiLU,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        common = {"depth": depth, "norm_layer": norm_layer, "act_layer": act_layer}
        self.class_net = HeadNet(
            in_specs,
            out_channels=num_anchors * num_classes,
            bias_init=-math.log((1.0 - prior_prob) / prior_prob),
            **common,
        )
        self.box_net = HeadNet(in_specs, out_channels=num_anchors * 4, **common)

    def forward(self, features: Mapping[str, torch.Tensor]) -> DetectionOutput:
        return DetectionOutput(self.class_net(features), self.box_net(features))


def flatten_levels(maps: Mapping[str, torch.Tensor], values_per_anchor: int) -> torch.Tensor:
    """``{level: [B, A*K, H, W]}`` -> ``[B, sum(H*W*A), K]`` in anchor order (level, y, x, anchor)."""
    b = next(iter(maps.values())).shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(b, -1, values_per_anchor) for m in maps.values()], dim=1)
