"""The effdet models that convert into this project: each one's effdet settings, the scaling row and config
overrides that build its equivalent, and effdet's prediction settings.

``effdet`` is not imported here: the settings are written out (checked against
``effdet.config.get_efficientdet_config`` by the tests), so converting needs only torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .detector import DenseModel, efficientdet
from .scaling import get_scale

__all__ = [
    "EFFDET_POSTPROCESS",
    "EFFDET_VARIANTS",
    "EffDetVariant",
    "build_effdet_equivalent",
    "config_overrides",
    "get_variant",
]

#: effdet's aspect ratios (x, y) and octave scales, the same for every variant supported here.
_ASPECT_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))


@dataclass(frozen=True)
class EffDetVariant:
    """One effdet model and what it is in this project.

    ``scale`` is the row of :data:`models.scaling.EFFICIENTDET_SCALES`; the remaining fields restate effdet's
    own config for the variant, so :meth:`row_overrides` can say where the row differs.
    """

    name: str
    scale: str
    backbone: str  #: timm model name
    padding: str  #: "same" (TensorFlow ports) or "native"
    image_size: int
    fpn_channels: int
    fpn_repeats: int
    head_depth: int
    fusion: str  #: our fusion kind ("fast" = effdet "fastattn", "softmax" = "attn", "sum")
    anchor_scale: float
    backbone_drop_path: float
    min_level: int = 3
    max_level: int = 7
    num_scales: int = 3
    aspect_ratios: tuple[tuple[float, float], ...] = field(default=_ASPECT_RATIOS)
    redundant_bias: bool = True  #: effdet keeps conv biases in front of BatchNorm (folded on conversion)
    activation: str = "silu"  #: neck and head activation (effdet's ``act_type``: "swish" is our "silu")

    #: Fields shared with :class:`models.scaling.EfficientDetScale`.
    _ROW_FIELDS = (
        "backbone", "image_size", "fpn_channels", "fpn_repeats", "head_depth", "anchor_scale", "fusion",
        "min_level", "max_level", "backbone_drop_path", "activation",
    )

    @property
    def num_anchors(self) -> int:
        return self.num_scales * len(self.aspect_ratios)

    def row_overrides(self) -> dict:
        """Fields of the ``scale`` row that this variant changes (``backbone`` compared without ``tf_``)."""
        row = get_scale(self.scale).as_dict()
        mine = asdict(self)
        out = {}
        for f in self._ROW_FIELDS:
            ours, theirs = row[f], mine[f]
            if f == "backbone":
                theirs = theirs.removeprefix("tf_")
            if ours != theirs:
                out[f] = theirs
        return out


def _tf(n: int, image: int, ch: int, reps: int, depth: int, fusion: str = "fast", **kw) -> EffDetVariant:
    return EffDetVariant(
        name=f"tf_efficientdet_d{n}",
        scale=f"d{n}",
        backbone=f"tf_efficientnet_b{n}",
        padding="same",
        image_size=image,
        fpn_channels=ch,
        fpn_repeats=reps,
        head_depth=depth,
        fusion=fusion,
        anchor_scale=kw.pop("anchor_scale", 4.0),
        backbone_drop_path=0.2,
        **kw,
    )


def _lite(n: int | str, image: int, ch: int, reps: int, depth: int, anchor_scale: float = 3.0,
          drop_path: float = 0.2) -> EffDetVariant:
    return EffDetVariant(
        name=f"tf_efficientdet_lite{n}",
        scale=f"lite{n}",
        backbone=f"tf_efficientnet_lite{str(n).removesuffix('x')}",
        padding="same",
        image_size=image,
        fpn_channels=ch,
        fpn_repeats=reps,
        head_depth=depth,
        fusion="sum",
        anchor_scale=anchor_scale,
        backbone_drop_path=drop_path,
        activation="relu6",
    )


#: effdet variants that convert: their effdet settings and this project's scaling row.
EFFDET_VARIANTS: dict[str, EffDetVariant] = {
    v.name: v
    for v in (
        _tf(0, 512, 64, 3, 3),
        _tf(1, 640, 88, 4, 3),
        _tf(2, 768, 112, 5, 3),
        _tf(3, 896, 160, 6, 4),
        _tf(4, 1024, 224, 7, 4),
        _tf(5, 1280, 288, 7, 4),
        _tf(6, 1280, 384, 8, 5, "sum"),
        EffDetVariant(
            "tf_efficientdet_d7", "d7", "tf_efficientnet_b6", "same", 1536, 384, 8, 5, "sum", 5.0, 0.2
        ),
        EffDetVariant(
            "tf_efficientdet_d7x", "d7x", "tf_efficientnet_b7", "same", 1536, 384, 8, 5, "sum", 4.0, 0.2,
            max_level=8,
        ),
        # PyTorch-native padding (d0, d1 trained by effdet's author; d2, d3 without published weights); no
        # redundant biases.
        EffDetVariant(
            "efficientdet_d0", "d0", "efficientnet_b0", "native", 512, 64, 3, 3, "fast", 4.0, 0.1,
            redundant_bias=False,
        ),
        EffDetVariant(
            "efficientdet_d1", "d1", "efficientnet_b1", "native", 640, 88, 4, 3, "fast", 4.0, 0.2,
            redundant_bias=False,
        ),
        EffDetVariant(
            "efficientdet_d2", "d2", "efficientnet_b2", "native", 768, 112, 5, 3, "fast", 4.0, 0.2,
            redundant_bias=False,
        ),
        EffDetVariant(
            "efficientdet_d3", "d3", "efficientnet_b3", "native", 896, 160, 6, 4, "fast", 4.0, 0.2,
            redundant_bias=False,
        ),
        _lite(0, 320, 64, 3, 3, drop_path=0.0),
        _lite(1, 384, 88, 4, 3),
        _lite(2, 448, 112, 5, 3),
        _lite(3, 512, 160, 6, 4, anchor_scale=4.0),
        _lite("3x", 640, 200, 6, 4),
        _lite(4, 640, 224, 7, 4, anchor_scale=4.0),
    )
}

#: effdet's prediction defaults (``DetBenchPredict`` / ``generate_detections``): top 5000 (anchor, class)
#: candidates per image, class-wise NMS at IoU 0.5, at most 100 detections, no score threshold, boxes
#: clipped to the image, box deltas decoded without clamping.
EFFDET_POSTPROCESS = {"topk": 5000, "iou_threshold": 0.5, "max_detections": 100, "score_threshold": 0.0,
                      "clip_boxes": True}


def get_variant(variant: str | EffDetVariant) -> EffDetVariant:
    if isinstance(variant, EffDetVariant):
        return variant
    try:
        return EFFDET_VARIANTS[variant]
    except KeyError:
        raise KeyError(f"unknown effdet variant {variant!r}; choose one of {sorted(EFFDET_VARIANTS)}") from None


def build_effdet_equivalent(variant: str | EffDetVariant, *, num_classes: int = 90) -> DenseModel:
    """The plain :class:`DenseModel` whose state dict :func:`models.effdet_convert.convert_effdet_state_dict`
    produces."""
    v = get_variant(variant)
    overrides = {k: val for k, val in v.row_overrides().items() if k != "backbone"}
    return efficientdet(
        v.scale,
        num_classes=num_classes,
        tf_padding=v.padding == "same",
        backbone=v.backbone,
        **overrides,
    )


def config_overrides(variant: str | EffDetVariant, *, num_classes: int = 90) -> list[str]:
    """Hydra overrides of ``configs/train.yaml`` whose ``model`` instantiates the converted model and whose
    anchors, box coder and post-processing reproduce effdet's predictions."""
    v = get_variant(variant)
    short = v.backbone.removeprefix("tf_").removeprefix("efficientnet_")
    group = f"tf_{short}" if v.padding == "same" and not short.startswith("lite") else short
    ratios = "[" + ",".join(f"[{x},{y}]" for x, y in v.aspect_ratios) + "]"
    pp = EFFDET_POSTPROCESS
    return [
        "task=detection",
        f"backbone={group}",
        f"scale={v.scale}",
        f"padding={v.padding}",
        f"backbone.name={v.backbone}",
        f"backbone.drop_path_rate={v.backbone_drop_path}",
        f"data.num_classes={num_classes}",
        f"model.image_size={v.image_size}",
        f"task.min_level={v.min_level}",
        f"neck.channels={v.fpn_channels}",
        f"neck.num_repeats={v.fpn_repeats}",
        f"neck.fusion={v.fusion}",
        f"neck.max_level={v.max_level}",
        f"head.depth={v.head_depth}",
        f"neck.act_layer.name={v.activation}",
        f"head.act_layer.name={v.activation}",
        f"anchors.anchor_scale={v.anchor_scale}",
        f"anchors.num_scales={v.num_scales}",
        f"anchors.aspect_ratios={ratios}",
        "+box_coder.clamp=null",  # effdet decodes without clamping the size deltas
        *(f"task.module.postprocess.{k}={str(val).lower() if isinstance(val, bool) else val}"
          for k, val in pp.items()),
    ]
