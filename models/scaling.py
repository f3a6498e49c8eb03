"""EfficientDet compound scaling (Tan, Pang, Le: "EfficientDet", CVPR 2020, Table 1) and the EfficientDet-Lite
family (TensorFlow automl's ``efficientdet-lite0..4``, as effdet's ``tf_efficientdet_lite*``).

One typed row per model. ``backbone=bN`` in the configs selects row ``dN`` (``b7`` selects ``d7x``), ``backbone=liteN``
row ``liteN`` (``scale=lite3x`` the wider Lite3); any field can still be overridden on its own. Training
hyper-parameters live elsewhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["EFFICIENTDET_SCALES", "EfficientDetScale", "get_scale", "scale_for_backbone"]


@dataclass(frozen=True)
class EfficientDetScale:
    name: str
    backbone: str  #: EfficientNet variant (timm name without the "tf_" prefix)
    image_size: int
    fpn_channels: int  #: BiFPN width
    fpn_repeats: int  #: BiFPN depth
    head_depth: int  #: box/class net depth
    anchor_scale: float
    fusion: str  #: BiFPN fusion kind
    min_level: int = 3
    max_level: int = 7
    backbone_drop_path: float = 0.2
    activation: str = "silu"  #: neck and head activation (:data:`layers.conv.ACTIVATIONS`)

    def as_dict(self) -> dict:
        return asdict(self)


EFFICIENTDET_SCALES: dict[str, EfficientDetScale] = {
    row.name: row
    for row in (
        EfficientDetScale("d0", "efficientnet_b0", 512, 64, 3, 3, 4.0, "fast"),
        EfficientDetScale("d1", "efficientnet_b1", 640, 88, 4, 3, 4.0, "fast"),
        EfficientDetScale("d2", "efficientnet_b2", 768, 112, 5, 3, 4.0, "fast"),
        EfficientDetScale("d3", "efficientnet_b3", 896, 160, 6, 4, 4.0, "fast"),
        EfficientDetScale("d4", "efficientnet_b4", 1024, 224, 7, 4, 4.0, "fast"),
        EfficientDetScale("d5", "efficientnet_b5", 1280, 288, 7, 4, 4.0, "fast"),
        EfficientDetScale("d6", "efficientnet_b6", 1280, 384, 8, 5, 4.0, "sum"),
        EfficientDetScale("d7", "efficientnet_b6", 1536, 384, 8, 5, 5.0, "sum"),
        EfficientDetScale("d7x", "efficientnet_b7", 1536, 384, 8, 5, 4.0, "sum", max_level=8),
        # Lite: EfficientNet-Lite backbones (no squeeze-excite, ReLU6), ReLU6 in the neck and heads and plain-sum
        # fusion, so that the whole network quantizes well.
        EfficientDetScale("lite0", "efficientnet_lite0", 320, 64, 3, 3, 3.0, "sum", backbone_drop_path=0.0,
                          activation="relu6"),
        EfficientDetScale("lite1", "efficientnet_lite1", 384, 88, 4, 3, 3.0, "sum", activation="relu6"),
        EfficientDetScale("lite2", "efficientnet_lite2", 448, 112, 5, 3, 3.0, "sum", activation="relu6"),
        EfficientDetScale("lite3", "efficientnet_lite3", 512, 160, 6, 4, 4.0, "sum", activation="relu6"),
        EfficientDetScale("lite3x", "efficientnet_lite3", 640, 200, 6, 4, 3.0, "sum", activation="relu6"),
        EfficientDetScale("lite4", "efficientnet_lite4", 640, 224, 7, 4, 4.0, "sum", activation="relu6"),
    )
}


def get_scale(name: str) -> EfficientDetScale:
    try:
        return EFFICIENTDET_SCALES[name]
    except KeyError:
        raise KeyError(f"unknown EfficientDet scale {name!r}; choose one of {sorted(EFFICIENTDET_SCALES)}") from None


def scale_for_backbone(backbone: str) -> EfficientDetScale:
    """``"b3"``/``"efficientnet_b3"``/``"tf_efficientnet_b3"`` -> the D3 row (``b7`` -> D7x);
    ``"lite3"``/``"tf_efficientnet_lite3"`` -> the Lite3 row."""
    short = backbone.removeprefix("tf_").removeprefix("efficientnet_")
    if short == "b7":
        return EFFICIENTDET_SCALES["d7x"]
    if len(short) == 2 and short[0] == "b" and short[1].isdigit():
        return EFFICIENTDET_SCALES[f"d{short[1]}"]
    if short in EFFICIENTDET_SCALES and short.startswith("lite"):
        return EFFICIENTDET_SCALES[short]
    raise KeyError(f"no EfficientDet scale for backbone {backbone!r}")
