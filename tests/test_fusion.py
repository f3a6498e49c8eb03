"""BatchNorm folding for inference: same outputs, no norms left in EfficientNet + BiFPN models."""

import pytest
import torch

from layers.norm_folding import fold_batchnorm
from models import efficientdet


def _randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every norm non-trivial statistics and affine parameters, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("tf_padding", [False, True])
def test_folded_detector_matches_and_has_no_norms(tf_padding):
    torch.manual_seed(0)
    model = efficientdet("d0", num_classes=5, tf_padding=tf_padding).eval()
    _randomise_norms(model)
    folded, report = fold_batchnorm(model)
    assert report.remaining == 0
    n_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # The head's norms are per level: one folded conv per (level, repeat), so folded == number of norms.
    assert report.folded == n_norms
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    for name in ref.cls_logits:
        torch.testing.assert_close(out.cls_logits[name], ref.cls_logits[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.box_deltas[name], ref.box_deltas[name], rtol=1e-4, atol=1e-4)


def test_folded_segmenter_matches():
    from functools import partial

    from backbones import TimmBackbone
    from heads import SegmentationHead
    from models import DenseModel
    from necks import BiFPN

    torch.manual_seed(0)
    model = DenseModel(
        backbone=TimmBackbone(name="efficientnet_b0", levels=(2, 3, 4, 5)),
        neck=partial(BiFPN, channels=32, num_repeats=2, min_level=2, max_level=6),
        head=partial(SegmentationHead, num_classes=7, channels=32, depth=2, aux_level="p4"),
    ).eval()
    _randomise_norms(model, seed=1)
    folded, report = fold_batchnorm(model)
    assert report.remaining == 0 and report.folded > 0
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
