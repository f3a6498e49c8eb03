"""Assembled EfficientDet models: compound scaling and the head's output contract."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from backbones import TimmBackbone
from heads import EfficientDetHead, flatten_levels
from models import EFFICIENTDET_SCALES, Detector, efficientdet, scale_for_backbone
from necks import BiFPN

# EfficientDet paper, Table 1 (90-class COCO models), millions of parameters.
PAPER_PARAMS = {"d0": 3.9, "d1": 6.6, "d2": 8.1, "d3": 12.0, "d4": 20.7, "d5": 33.7, "d6": 51.9, "d7x": 77.0}


@pytest.mark.parametrize("scale", sorted(PAPER_PARAMS))
def test_parameter_count_matches_paper(scale):
    model = efficientdet(scale, num_classes=90)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions / PAPER_PARAMS[scale] - 1) < 0.01, f"{scale}: {millions:.3f}M vs {PAPER_PARAMS[scale]}M"


def test_tf_variant_has_same_parameter_count_and_same_padding():
    native = efficientdet("d0")
    tf = efficientdet("d0", tf_padding=True)
    assert sum(p.numel() for p in native.parameters()) == sum(p.numel() for p in tf.parameters())
    assert tf.backbone.model_name == "tf_efficientnet_b0"
    pools = [m for m in tf.neck.modules() if m.__class__.__name__ == "MaxPoolDown"]
    assert pools and all(p.pad_mode == "same" for p in pools)


def test_backbone_to_scale_row():
    assert scale_for_backbone("b3").name == "d3"
    assert scale_for_backbone("tf_efficientnet_b7").name == "d7x"
    row = EFFICIENTDET_SCALES["d7x"]
    assert (row.image_size, row.fpn_channels, row.fpn_repeats, row.head_depth, row.max_level) == (1536, 384, 8, 5, 8)
    assert EFFICIENTDET_SCALES["d7"].anchor_scale == 5.0
    assert EFFICIENTDET_SCALES["d6"].fusion == "sum" and EFFICIENTDET_SCALES["d5"].fusion == "fast"


def test_overrides_and_unknown_override():
    m = efficientdet("d0", fpn_channels=32, fpn_repeats=1, head_depth=2, num_classes=5)
    assert all(s.channels == 32 for s in m.out_specs.values())
    assert len(m.neck.cells) == 1 and len(m.head.class_net.convs) == 2
    with pytest.raises(TypeError, match="fpn_width"):
        efficientdet("d0", fpn_width=3)


def test_detector_outputs_and_prior_bias():
    num_classes = 7
    model = Detector(
        backbone=TimmBackbone(name="b0"),
        neck=functools.partial(BiFPN, channels=24, num_repeats=1),
        head=functools.partial(EfficientDetHead, num_classes=num_classes, depth=2),
    ).eval()
    x = torch.randn(2, 3, 128, 192)
    out = model(x)
    assert list(out.cls_logits) == ["p3", "p4", "p5", "p6", "p7"]
    positions = 0
    for name, t in out.cls_logits.items():
        stride = 2 ** int(name[1:])
        assert t.shape == (2, 9 * num_classes, math.ceil(128 / stride), math.ceil(192 / stride))
        assert out.box_deltas[name].shape == (2, 9 * 4, *t.shape[-2:])
        positions += t.shape[-2] * t.shape[-1]
    cls = flatten_levels(out.cls_logits, num_classes)
    assert cls.shape == (2, positions * 9, num_classes)
    # Flattened order is (level, y, x, anchor, class): check one element by hand.
    p3 = out.cls_logits["p3"]
    y, xx, a, k = 1, 2, 4, 3
    flat_index = (y * p3.shape[-1] + xx) * 9 + a
    assert cls[1, flat_index, k] == p3[1, a * num_classes + k, y, xx]
    # The class bias starts at the prior probability 0.01.
    bias = model.head.class_net.predict.pointwise.bias
    assert torch.allclose(torch.sigmoid(bias), torch.full_like(bias, 0.01), atol=1e-6)
    # Same output type in train mode.
    assert type(model.train()(x)) is type(out)
