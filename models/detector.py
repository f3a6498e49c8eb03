"""Dense prediction models: backbone + neck + head composed into one plain ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from backbones.contract import FeatureSpec
from backbones.timm_backbone import TimmBackbone
from heads.efficientdet import EfficientDetHead
from layers.conv import activation_layer
from necks.bifpn import BiFPN
from utils.sizes import image_hw

from .scaling import get_scale

__all__ = ["DenseModel", "Detector", "Segmenter", "efficientdet"]

SpecsToModule = Callable[[Mapping[str, FeatureSpec]], nn.Module]


class DenseModel(nn.Module):
    """``images -> backbone -> neck -> head``: a detector or a segmenter, depending on the head.

    ``neck`` and ``head`` are either modules or factories that take the previous stage's ``out_specs``
    (e.g. ``functools.partial(BiFPN, channels=64, num_repeats=3)``), so channel counts are derived from
    the backbone, never repeated. The module returns raw head outputs in training and evaluation; anchors,
    losses and post-processing live in the task.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module | SpecsToModule,
        head: nn.Module | SpecsToModule,
        image_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        #: Default input resolution that data pipelines and exporters use: one side (a square) or ``(H, W)``.
        #: The module itself accepts any size that is a multiple of the finest stride (coarser maps round up).
        self.image_size = image_size if image_size is None or isinstance(image_size, int) else image_hw(image_size)
        self.backbone = backbone
        self.neck = neck if isinstance(neck, nn.Module) else neck(backbone.out_specs)
        self.head = head if isinstance(head, nn.Module) else head(self.neck.out_specs)

    @property
    def out_specs(self) -> dict[str, FeatureSpec]:
        return self.neck.out_specs

    def forward(self, images: torch.Tensor) -> Any:
        return self.head(self.neck(self.backbone(images)))


#: Names that say what the composed model is for; all are :class:`DenseModel`.
Detector = DenseModel
Segmenter = DenseModel


def efficientdet(
    scale: str = "d0",
    *,
    num_classes: int = 90,
    tf_padding: bool = False,
    backbone: str | None = None,
    pretrained_backbone: bool = False,
    **overrides: Any,
) -> Detector:
    """Build EfficientDet-``scale`` from the compound-scaling table.

    ``overrides`` replace fields of the row (``fpn_channels``, ``fpn_repeats``, ``head_depth``, ``fusion``,
    ``min_level``, ``max_level``, ``backbone_drop_path``, ``activation``). ``tf_padding`` selects timm's ``tf_`` backbone and
    TensorFlow "same" pooling, as the published EfficientDet weights need.
    """
    row = get_scale(scale)
    unknown = set(overrides) - set(row.as_dict())
    if unknown:
        raise TypeError(f"unknown EfficientDet overrides: {sorted(unknown)}")
    cfg = {**row.as_dict(), **overrides}
    name = backbone or cfg["backbone"]
    if tf_padding and not name.startswith("tf_"):
        name = f"tf_{name}"
    pad_mode = "same" if tf_padding else "native"
    act_layer = activation_layer(cfg["activation"])
    bb = TimmBackbone(
        name=name,
        levels=tuple(range(cfg["min_level"], 6)),
        pretrained=pretrained_backbone,
        drop_path_rate=cfg["backbone_drop_path"],
    )
    neck = BiFPN(
        bb.out_specs,
        channels=cfg["fpn_channels"],
        num_repeats=cfg["fpn_repeats"],
        fusion=cfg["fusion"],
        min_level=cfg["min_level"],
        max_level=cfg["max_level"],
        pad_mode=pad_mode,
        act_layer=act_layer,
    )
    head = EfficientDetHead(neck.out_specs, num_classes=num_classes, depth=cfg["head_depth"], act_layer=act_layer)
    return Detector(backbone=bb, neck=neck, head=head, image_size=cfg["image_size"])
