"""EfficientDet-Lite (``backbone=lite0`` .. ``lite4``, ``scale=lite3x``): the same networks as effdet's
``tf_efficientdet_lite*``, built from the configs."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from models import EFFICIENTDET_SCALES, scale_for_backbone
from tasks.config import compose

effdet = pytest.importorskip("effdet")

LITE = ["lite0", "lite1", "lite2", "lite3", "lite3x", "lite4"]


def _compose(scale: str, *extra: str):
    return compose("train", [f"backbone={scale.removesuffix('x')}", f"scale={scale}", *extra])


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scale", LITE)
def test_parameter_count_equals_effdet(scale):
    """Exactly effdet's count once its redundant conv biases are left out: effdet's TensorFlow ports keep a bias
    on each conv that feeds a BatchNorm, which conversion folds into the norm's running mean (the published
    counts, e.g. Lite0's 3.243M, include them)."""
    with torch.device("meta"):
        ours = _count(instantiate(_compose(scale).model))
    name = f"tf_efficientdet_{scale}"
    lean = effdet.create_model(name, pretrained=False, pretrained_backbone=False, redundant_bias=False)
    assert ours == _count(lean), f"{scale}: {ours} vs effdet {_count(lean)}"
    full = effdet.create_model(name, pretrained=False, pretrained_backbone=False)
    biases = [k for k, _ in full.named_parameters() if k not in dict(lean.named_parameters())]
    assert biases and all(k.endswith(".bias") for k in biases)
    assert _count(full) - ours == sum(p.numel() for k, p in full.named_parameters() if k in biases)
    print(f"{name}: {ours} parameters ({_count(full)} in effdet with its {len(biases)} redundant biases)")


@pytest.mark.parametrize("scale", LITE)
def test_config_is_effdets(scale):
    cfg = _compose(scale)
    c = effdet.get_efficientdet_config(f"tf_efficientdet_{scale}")
    m = cfg.model
    assert m.backbone.name == c.backbone_name and cfg.padding == "same" == c.pad_type
    assert m.backbone.drop_path_rate == c.backbone_args["drop_path_rate"]
    assert m.image_size == c.image_size[0]
    assert (m.neck.channels, m.neck.num_repeats, m.head.depth) == (c.fpn_channels, c.fpn_cell_repeats,
                                                                   c.box_class_repeats)
    assert (m.neck.min_level, m.neck.max_level) == (c.min_level, c.max_level)
    assert m.neck.fusion == "sum" and c.fpn_name == "bifpn_sum"
    assert m.neck.act_layer.name == m.head.act_layer.name == c.act_type == "relu6"
    assert cfg.anchors.anchor_scale == c.anchor_scale and cfg.anchors.num_scales == c.num_scales
    assert scale_for_backbone(c.backbone_name).name == scale.removesuffix("x")
    assert EFFICIENTDET_SCALES[scale].backbone == c.backbone_name.removeprefix("tf_")


def test_lite0_builds_relu6_sum_model_with_half_normalisation():
    from tasks.runner import build_task

    cfg = _compose("lite0", "data=synthetic", "data.num_classes=3")
    task = build_task(cfg)
    model = task.model
    acts = {type(m) for m in [*model.neck.modules(), *model.head.modules()]
            if isinstance(m, (torch.nn.SiLU, torch.nn.ReLU6))}
    assert acts == {torch.nn.ReLU6}
    assert all(node.weight is None for cell in model.neck.cells for node in cell.nodes)  # plain sum
    assert task.normalization == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # effdet's Lite mean/std
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert list(out.cls_logits) == ["p3", "p4", "p5", "p6", "p7"]
    assert out.cls_logits["p3"].shape == (1, 9 * 3, 16, 16)
    assert all(torch.isfinite(t).all() for t in out.box_deltas.values())
