"""Segmentation head and neck contracts with P2, the loss, and the confusion-matrix metrics (hand-computed)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from gloo_processes import run_on_two_processes

from backbones import FeatureSpec, TimmBackbone
from evaluation.miou import ConfusionMatrix, format_iou_table, iou_from_confusion
from heads import SegmentationHead, SegmentationLoss, SegmentationOutput, ohem_cross_entropy, upsample_logits
from models import DenseModel
from necks import BiFPN


@pytest.fixture(scope="module")
def p2_model():
    torch.manual_seed(0)
    return DenseModel(
        backbone=TimmBackbone(name="b0", levels=(2, 3, 4, 5), drop_path_rate=0.0),
        neck=functools.partial(BiFPN, channels=32, num_repeats=1, min_level=2, max_level=7),
        head=functools.partial(SegmentationHead, num_classes=5, depth=2, aux_level="p4"),
    )


def test_p2_neck_contract(p2_model):
    specs = p2_model.neck.out_specs
    assert list(specs) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in specs.values()] == [4, 8, 16, 32, 64, 128]
    assert {s.channels for s in specs.values()} == {32}
    x = torch.randn(1, 3, 128, 256)
    feats = p2_model.neck(p2_model.backbone(x))
    for name, spec in specs.items():
        assert feats[name].shape == (1, 32, math.ceil(128 / spec.stride), math.ceil(256 / spec.stride))


def test_head_predicts_at_stride_4_in_train_and_eval(p2_model):
    x = torch.randn(2, 3, 128, 256)
    for mode in (True, False):
        out = p2_model.train(mode)(x)
        assert isinstance(out, SegmentationOutput)
        assert out.logits.shape == (2, 5, 32, 64)
        assert out.aux_logits.shape == (2, 5, 8, 16)
        assert torch.isfinite(out.logits).all()
    assert p2_model.head.out_stride == 4
    full = upsample_logits(out.logits, x.shape[-2:])
    assert full.shape == (2, 5, 128, 256)
    assert upsample_logits(full, (128, 256)) is full


def test_head_backward_reaches_backbone(p2_model):
    p2_model.train()
    out = p2_model(torch.randn(2, 3, 128, 128))
    (out.logits.mean() + out.aux_logits.mean()).backward()
    grads = [p.grad for p in p2_model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_head_projects_inputs_of_other_widths():
    specs = {"p2": FeatureSpec(24, 4), "p3": FeatureSpec(40, 8), "p4": FeatureSpec(112, 16)}
    head = SegmentationHead(specs, num_classes=3, channels=16, depth=1, dropout=0.0)
    feats = {n: torch.randn(1, s.channels, 64 // s.stride, 64 // s.stride) for n, s in specs.items()}
    out = head(feats)
    assert out.logits.shape == (1, 3, 16, 16) and out.aux_logits is None
    with pytest.raises(ValueError, match="not among the inputs"):
        SegmentationHead(specs, num_classes=3, levels=["p5"])
    with pytest.raises(ValueError, match="aux_level"):
        SegmentationHead(specs, num_classes=3, aux_level="p9")


def test_head_on_plain_timm_backbone_features():
    bb = TimmBackbone(name="resnet18", levels=(2, 3, 4, 5))
    head = SegmentationHead(bb.out_specs, num_classes=4, channels=32, depth=1)
    out = head.eval()(bb.eval()(torch.randn(1, 3, 64, 96)))
    assert out.logits.shape == (1, 4, 16, 24)


# ---------------------------------------------------------------------------------------------- loss
def test_loss_is_cross_entropy_at_label_resolution_with_ignore():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :2] = 255
    loss = SegmentationLoss(aux_weight=0.0)(SegmentationOutput(logits), target)
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, target, ignore_index=255)
    assert torch.allclose(loss["loss"], expected)
    assert float(loss["aux_loss"]) == 0.0


def test_aux_term_is_weighted():
    logits = torch.zeros(1, 2, 2, 2)
    aux = torch.tensor([[[[2.0]], [[0.0]]]])  # [1, 2, 1, 1]: class 0 favoured everywhere
    target = torch.ones(1, 2, 2, dtype=torch.long)
    out = SegmentationLoss(aux_weight=0.5)(SegmentationOutput(logits, aux), target)
    assert math.isclose(float(out["seg_loss"]), math.log(2), rel_tol=1e-6)
    aux_ce = -math.log(math.exp(0) / (math.exp(0) + math.exp(2)))
    assert math.isclose(float(out["aux_loss"]), aux_ce, rel_tol=1e-5)
    assert math.isclose(float(out["loss"]), math.log(2) + 0.5 * aux_ce, rel_tol=1e-5)


def test_all_ignored_target_gives_zero_loss_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255)
    for loss in (SegmentationLoss(), SegmentationLoss(ohem_threshold=0.7)):
        value = loss(SegmentationOutput(logits), target)["loss"]
        assert float(value.detach()) == 0.0
        value.backward()


def test_weighted_smoothed_loss_is_cross_entropy_mean():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[1, 3:] = 255
    weights = [0.5, 2.0, 1.0]
    loss = SegmentationLoss(aux_weight=0.0, class_weights=weights, label_smoothing=0.1)(SegmentationOutput(logits),
                                                                                           target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=255, label_smoothing=0.1)
    torch.testing.assert_close(loss["loss"], expected)


@pytest.mark.parametrize("ohem", [None, 0.7])
def test_loss_does_not_wait_for_the_device(ohem):
    """No host synchronisation (a training step with it can be captured as a CUDA graph)."""
    from benchmarks.ops import OpCounter

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :2] = 255
    loss = SegmentationLoss(ohem_threshold=ohem, ohem_min_kept=20, class_weights=[1.0, 2.0, 0.5])
    with OpCounter() as counter:
        out = loss(SegmentationOutput(logits, logits), target)
        out["loss"].backward()
    assert counter.operations > 10 and counter.syncs == 0


def test_ohem_keeps_pixels_below_threshold_or_the_hardest_min_kept():
    # Four pixels, two classes, true class 0 everywhere; p(true) = sigmoid(d) for logit difference d.
    d = torch.tensor([3.0, 1.0, -1.0, 0.5])
    logits = torch.stack([d, torch.zeros(4)]).view(1, 2, 1, 4)
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    ce = F.softplus(-d)  # -log sigmoid(d)
    # p = [0.95, 0.73, 0.27, 0.62]: below 0.7 are pixels 2 and 3
    got = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=1)
    assert torch.allclose(got, ce[[2, 3]].mean())
    # min_kept=3 > 2 hard pixels: the three lowest probabilities (pixels 2, 3, 1)
    got = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=3)
    assert torch.allclose(got, ce[[1, 2, 3]].mean())
    # ignored pixels are never kept, even when min_kept asks for all
    target[0, 0, 2] = 255
    got = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=10)
    assert torch.allclose(got, ce[[0, 1, 3]].mean())

    with pytest.raises(ValueError, match="min_kept must be >= 1, got 0"):
        ohem_cross_entropy(logits, target, threshold=0.7, min_kept=0)
    with pytest.raises(ValueError, match="ohem_min_kept must be >= 1, got 0"):
        SegmentationLoss(ohem_threshold=0.7, ohem_min_kept=0)
    SegmentationLoss(ohem_threshold=None, ohem_min_kept=0)  # OHEM off: the count is not used


def test_class_weights_move_to_the_logits_device_once():
    """The weights are moved the first time and kept there (no copy from the host in every step)."""
    loss = SegmentationLoss(class_weights=[1.0, 2.0, 0.5])
    logits = torch.randn(1, 3, 4, 4, device="meta")
    loss(SegmentationOutput(logits, None), torch.zeros(1, 4, 4, dtype=torch.long, device="meta"))
    moved = loss.class_weights
    assert moved.device.type == "meta"
    loss(SegmentationOutput(logits, None), torch.zeros(1, 4, 4, dtype=torch.long, device="meta"))
    assert loss.class_weights is moved


# ---------------------------------------------------------------------------------------------- metrics
def test_confusion_matrix_and_iou_hand_computed():
    m = ConfusionMatrix(3, class_names=["a", "b", "c"])
    target = torch.tensor([[0, 0, 1, 1], [1, 255, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 0]])
    m.update(pred, target)
    expected = torch.tensor([[2, 1, 0], [1, 2, 0], [0, 0, 1]])
    assert torch.equal(m.matrix, expected)
    out = m.compute()
    # a: tp 2, fp 1, fn 1 -> 0.5; b: tp 2, fp 1, fn 1 -> 0.5; c: tp 1 -> 1.0 (the ignored pixel's "2" is not an fp)
    assert out["IoU"] == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert math.isclose(out["mIoU"], 2.0 / 3.0)
    assert math.isclose(out["aAcc"], 5 / 7)
    assert "mIoU" in format_iou_table(out) and "c" in format_iou_table(out)


def test_absent_class_is_left_out_of_the_mean_and_split_level_not_per_image():
    m = ConfusionMatrix(3)
    m.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # image 1: class 1 missed
    m.update(torch.tensor([1, 1]), torch.tensor([1, 1]))  # image 2: perfect
    out = m.compute()
    assert out["IoU"]["2"] is None  # never in gt nor predicted
    # split level: class 0: tp 3, fp 1 -> 0.75; class 1: tp 2, fn 1 -> 2/3 (per-image averaging would differ)
    assert math.isclose(out["IoU"]["0"], 0.75) and math.isclose(out["IoU"]["1"], 2 / 3)
    assert math.isclose(out["mIoU"], (0.75 + 2 / 3) / 2)
    conf = torch.tensor([[0, 0], [0, 0]])
    assert torch.isnan(iou_from_confusion(conf)).all()


def test_predicting_an_absent_class_counts_against_it():
    m = ConfusionMatrix(2)
    m.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    out = m.compute()
    assert out["IoU"]["1"] == 0.0 and math.isclose(out["mIoU"], 0.25)


def test_target_out_of_range_is_an_error():
    m = ConfusionMatrix(2)
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 7]))


def _reduce_on(rank: int) -> tuple[float, list]:
    m = ConfusionMatrix(2)
    if rank == 0:
        m.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    else:
        m.update(torch.tensor([1, 1]), torch.tensor([1, 0]))
    return m.compute()["mIoU"], m.reduced().tolist()


def test_confusion_matrix_reduces_across_two_processes():
    results = run_on_two_processes(_reduce_on)
    single = ConfusionMatrix(2)
    single.update(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 0]))
    for miou, matrix in results:
        assert matrix == single.reduced().tolist() == [[1, 1], [1, 2]]
        assert math.isclose(miou, single.compute()["mIoU"])
