"""Focal and Huber losses and the DetectionLoss normalisation / ignore handling, by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from heads.losses import DetectionLoss, huber_loss, sigmoid_focal_loss

# Focal factor at logit 0 (p = 0.5) without alpha: (1 - 0.5)**1.5 * BCE = 0.35355339 * ln 2.
UNIT = 0.5**1.5 * math.log(2.0)


def test_focal_loss_by_hand():
    logits = torch.tensor([0.0, 0.0, 2.0, 2.0])
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=1.5)
    # logit 0, target 1: alpha_t = 0.25, p_t = 0.5, BCE = ln 2 -> 0.25 * 0.353553 * 0.693147 = 0.0612661
    assert loss[0].item() == pytest.approx(0.0612661, rel=1e-5)
    # logit 0, target 0: alpha_t = 0.75 -> three times the above.
    assert loss[1].item() == pytest.approx(0.1837984, rel=1e-5)
    # logit 2, target 0: p = 1 / (1 + e**-2) = 0.880797, p_t = 0.119203, (1 - p_t)**1.5 = 0.826645,
    # BCE = -ln(1 - p) = ln(1 + e**2) = 2.126928 -> 0.75 * 0.826645 * 2.126928 = 1.318645
    assert loss[2].item() == pytest.approx(1.318645, rel=1e-5)
    # logit 2, target 1: p_t = p, (1 - p)**1.5 = 0.041156, BCE = -ln p = 0.126928 -> 0.25 * ... = 0.0013060
    p = 1.0 / (1.0 + math.exp(-2.0))
    assert loss[3].item() == pytest.approx(0.25 * (1.0 - p) ** 1.5 * -math.log(p), rel=1e-5)
    assert loss[3].item() == pytest.approx(0.0013060, rel=1e-3)


def test_focal_with_gamma_0_alpha_half_is_half_bce():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 30, generator=g) * 3
    t = (torch.rand(4, 30, generator=g) > 0.5).float()
    ref = 0.5 * F.binary_cross_entropy_with_logits(x, t, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(x, t, alpha=0.5, gamma=0.0), ref)
    # With gamma > 0 easy examples are down-weighted: never above the gamma=0 loss.
    assert (sigmoid_focal_loss(x, t, alpha=0.5, gamma=2.0) <= ref + 1e-7).all()


def test_label_smoothing_changes_the_bce_target_only():
    # logit 1, target 1, smoothing 0.2 -> BCE target 0.9: BCE = ln(1 + e) - 0.9 = 1.3132617 - 0.9 = 0.4132617;
    # p_t and alpha_t stay on the hard target: 0.25 * (1 - 0.7310586)**1.5 = 0.25 * 0.1394718.
    loss = sigmoid_focal_loss(
        torch.tensor([1.0]), torch.tensor([1.0]), alpha=0.25, gamma=1.5, label_smoothing=0.2
    )
    assert loss.item() == pytest.approx(0.25 * 0.1394718 * 0.4132617, rel=1e-5)
    assert loss.item() == pytest.approx(0.0144096, rel=1e-4)
    # Negative target: BCE target 0.1, modulating factor from p_t = 1 - p.
    neg = sigmoid_focal_loss(
        torch.tensor([1.0]), torch.tensor([0.0]), alpha=0.25, gamma=1.5, label_smoothing=0.2
    )
    p = 1.0 / (1.0 + math.exp(-1.0))
    assert neg.item() == pytest.approx(0.75 * p**1.5 * (math.log(1 + math.e) - 0.1), rel=1e-5)


def test_huber_quadratic_and_linear_regions():
    pred = torch.tensor([0.05, -0.05, 0.1, 0.3, -1.0, 2.5])
    target = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.5])
    loss = huber_loss(pred, target, delta=0.1)
    expected = [
        0.5 * 0.05**2,  # quadratic: 0.00125
        0.5 * 0.05**2,
        0.5 * 0.1**2,  # at delta both branches agree: 0.005
        0.1 * (0.3 - 0.05),  # linear: 0.025
        0.1 * (1.0 - 0.05),  # 0.095
        0.1 * (2.0 - 0.05),  # 0.195
    ]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=g), torch.randn(50, generator=g)
    torch.testing.assert_close(huber_loss(x, y, delta=0.7), F.huber_loss(x, y, reduction="none", delta=0.7))


def _tiny_example():
    # 1 image, 3 anchors, 2 classes: anchor 0 positive (class 1), anchor 1 background, anchor 2 ignored.
    # The positive's box errors are 0.05, 0, 0, 0.3 (targets not 0, so both box masks count all four).
    logits = torch.zeros(1, 3, 2)
    deltas = torch.tensor([[[0.15, 0.2, -0.1, 0.8], [9.0, 9.0, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0]]])
    cls_t = torch.tensor([[1, -1, -2]])
    box_t = torch.zeros(1, 3, 4)
    box_t[0, 0] = torch.tensor([0.1, 0.2, -0.1, 0.5])
    return logits, deltas, cls_t, box_t


def test_detection_loss_by_hand():
    logits, deltas, cls_t, box_t = _tiny_example()
    out = DetectionLoss(num_classes=2)(logits, deltas, cls_t, box_t, torch.tensor(1.0))
    assert set(out) == {"loss", "cls_loss", "box_loss"}
    normalizer = 1.0 + 1.0
    # Anchor 0: class 1 positive (alpha 0.25) + class 0 negative (0.75); anchor 1: two negatives; anchor 2: 0.
    cls_sum = (0.25 + 0.75) * UNIT + 2 * 0.75 * UNIT
    assert out["cls_loss"].item() == pytest.approx(cls_sum / normalizer, rel=1e-5)
    # Only the positive anchor's box counts: 0.5 * 0.05**2 + 0.1 * (0.3 - 0.05) = 0.02625, / (2 * 4).
    assert out["box_loss"].item() == pytest.approx(0.02625 / (normalizer * 4), rel=1e-5)
    assert out["loss"].item() == pytest.approx(cls_sum / normalizer + 50.0 * 0.02625 / 8, rel=1e-5)
    assert DetectionLoss(num_classes=2, box_mask="nonzero")(logits, deltas, cls_t, box_t, torch.tensor(1.0)) == out
    # A coordinate whose target is exactly 0: counted by default, left out with box_mask="nonzero" (effdet's rule).
    box_t[0, 0, 1], deltas[0, 0, 1] = 0.0, 0.7
    counted = DetectionLoss(num_classes=2)(logits, deltas, cls_t, box_t, torch.tensor(1.0))
    left_out = DetectionLoss(num_classes=2, box_mask="nonzero")(logits, deltas, cls_t, box_t, torch.tensor(1.0))
    assert left_out["box_loss"].item() == out["box_loss"].item()
    # error 0.7: 0.1 * (0.7 - 0.05) = 0.065 more, / (2 * 4)
    assert counted["box_loss"].item() == pytest.approx((0.02625 + 0.065) / 8, rel=1e-5)


def test_detection_loss_ignore_and_background_handling():
    logits, deltas, cls_t, box_t = _tiny_example()
    loss = DetectionLoss(num_classes=2, box_loss_weight=1.0)
    base = loss(logits, deltas, cls_t, box_t, torch.tensor(1.0))
    # Changing the ignored anchor's logits or the deltas of non-positive anchors changes nothing ...
    logits2, deltas2 = logits.clone(), deltas.clone()
    logits2[0, 2] = torch.tensor([7.0, -3.0])
    deltas2[0, 1:] = -4.0
    same = loss(logits2, deltas2, cls_t, box_t, torch.tensor(1.0))
    for k in base:
        assert same[k].item() == pytest.approx(base[k].item(), rel=1e-6)
    # ... while a background anchor's logits count (all-zero target).
    logits3 = logits.clone()
    logits3[0, 1, 0] = 2.0
    changed = loss(logits3, deltas, cls_t, box_t, torch.tensor(1.0))
    # Background class 0 moved from logit 0 (0.75 * UNIT) to logit 2 (1.318645, see the focal test).
    assert (changed["cls_loss"] - base["cls_loss"]).item() == pytest.approx(
        (1.318645 - 0.75 * UNIT) / 2, rel=1e-4
    )
    # Gradients: none reach the ignored anchor's logits or non-positive anchors' deltas.
    lg, dl = logits.clone().requires_grad_(), deltas.clone().requires_grad_()
    loss(lg, dl, cls_t, box_t, torch.tensor(1.0))["loss"].backward()
    assert lg.grad[0, 2].abs().sum() == 0 and lg.grad[0, 1].abs().sum() > 0
    assert dl.grad[0, 1:].abs().sum() == 0 and dl.grad[0, 0].abs().sum() > 0


def test_detection_loss_normalizer_is_batch_positives_plus_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 3, generator=g)
    deltas = torch.randn(2, 6, 4, generator=g)
    cls_t = torch.tensor([[0, 2, -1, -1, -2, -1], [-1, 1, -1, -1, -1, -2]])
    box_t = torch.randn(2, 6, 4, generator=g) * (cls_t >= 0)[..., None]
    loss = DetectionLoss(num_classes=3, alpha=0.25, gamma=1.5)
    out = loss(logits, deltas, cls_t, box_t, torch.tensor(3.0))
    # Independent reduction: sum over cared anchors, divided by (3 + 1).
    onehot = torch.zeros(2, 6, 3)
    for b, a in torch.nonzero(cls_t >= 0).tolist():
        onehot[b, a, cls_t[b, a]] = 1.0
    focal = sigmoid_focal_loss(logits, onehot)
    cared = (cls_t != -2).float()[..., None]
    assert out["cls_loss"].item() == pytest.approx(((focal * cared).sum() / 4).item(), rel=1e-5)
    pos = (cls_t >= 0).float()[..., None]
    box = (F.huber_loss(deltas, box_t, reduction="none", delta=0.1) * pos).sum() / 16
    assert out["box_loss"].item() == pytest.approx(box.item(), rel=1e-5)
    # A batch summed as one scalar or given per image gives the same normaliser.
    per_image = loss(logits, deltas, cls_t, box_t, torch.tensor([2.0, 1.0]))
    assert per_image["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_bf16_logits_give_float32_losses_and_gradients():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 10, 3, generator=g) * 4).to(torch.bfloat16).requires_grad_()
    deltas = torch.randn(2, 10, 4, generator=g).to(torch.bfloat16).requires_grad_()
    cls_t = torch.full((2, 10), -1)
    cls_t[0, 3], cls_t[1, 7] = 2, 0
    out = DetectionLoss(num_classes=3)(logits, deltas, cls_t, torch.zeros(2, 10, 4), torch.tensor(2.0))
    assert all(v.dtype == torch.float32 and v.shape == () for v in out.values())
    ref = DetectionLoss(num_classes=3)(
        logits.float(), deltas.float(), cls_t, torch.zeros(2, 10, 4), torch.tensor(2.0)
    )
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    out["loss"].backward()
    assert torch.isfinite(logits.grad.float()).all() and torch.isfinite(deltas.grad.float()).all()
    # Saturated logits keep finite gradients with gamma 0 and 1.5.
    for gamma in (0.0, 1.5):
        x = torch.tensor([40.0, -40.0], requires_grad=True)
        sigmoid_focal_loss(x, torch.tensor([1.0, 0.0]), gamma=gamma).sum().backward()
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": 2, "alpha": 1.5},
        {"num_classes": 2, "gamma": -1.0},
        {"num_classes": 2, "label_smoothing": 1.0},
        {"num_classes": 2, "huber_delta": 0.0},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        DetectionLoss(**kwargs)


def test_wrong_number_of_classes_raises():
    with pytest.raises(ValueError, match="classes"):
        DetectionLoss(num_classes=3)(
            torch.zeros(1, 2, 4),
            torch.zeros(1, 2, 4),
            torch.full((1, 2), -1),
            torch.zeros(1, 2, 4),
            torch.tensor(0.0),
        )


@pytest.mark.parametrize("gamma", [0.0, 1.5, 2.0])
@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_detection_loss_equals_focal_loss_over_one_hot_targets(gamma, alpha):
    """DetectionLoss computes the classification loss without one-hot targets; it must equal the plain focal
    loss summed over the cared anchors, in value and in gradient, for every kind of anchor."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 50, 7, generator=g) * 6).requires_grad_()  # includes saturated logits
    cls_t = torch.randint(-2, 7, (3, 50), generator=g)  # positives, background (-1) and ignored (-2)
    deltas, box_t = torch.zeros(3, 50, 4), torch.zeros(3, 50, 4)
    num_pos = (cls_t >= 0).sum().float()
    out = DetectionLoss(num_classes=7, alpha=alpha, gamma=gamma)(logits, deltas, cls_t, box_t, num_pos)
    (grad,) = torch.autograd.grad(out["cls_loss"], logits)

    ref_logits = logits.detach().clone().requires_grad_()
    onehot = torch.zeros(3, 50, 7)
    for b, a in torch.nonzero(cls_t >= 0).tolist():
        onehot[b, a, cls_t[b, a]] = 1.0
    cared = (cls_t != -2).float()[..., None]
    ref = (sigmoid_focal_loss(ref_logits, onehot, alpha=alpha, gamma=gamma) * cared).sum() / (num_pos + 1)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert out["cls_loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert torch.isfinite(grad).all()
    assert grad[cls_t == -2].abs().sum() == 0  # ignored anchors get no gradient


def _effdet_targets_and_loss(effdet, hw, boxes, labels, cls, box, num_classes):
    """effdet's AnchorLabeler and loss_fn (DetBenchTrain's) on the same batch: flat targets (xyxy order), positives
    and (loss, cls_loss, box_loss). effdet takes yxyx boxes, labels 1..C (-1 padding) and per-level NCHW outputs."""
    from effdet.anchors import AnchorLabeler, Anchors
    from effdet.loss import loss_fn

    config = effdet.get_efficientdet_config("tf_efficientdet_d0")
    config.image_size = hw
    anchors = Anchors.from_config(config)
    labeler = AnchorLabeler(anchors, num_classes, match_threshold=0.5)
    cls_t, box_t, num_pos = labeler.batch_label_anchors(
        boxes[..., [1, 0, 3, 2]], torch.where(labels >= 0, labels + 1, -1).float())
    b, per_level_cls, per_level_box, start = cls.shape[0], [], [], 0
    for level in range(config.min_level, config.max_level + 1):
        h, w = anchors.feat_sizes[level]
        n = h * w * 9
        per_level_cls.append(cls[:, start:start + n].reshape(b, h, w, 9 * num_classes).permute(0, 3, 1, 2))
        per_level_box.append(box[:, start:start + n][..., [1, 0, 3, 2]].reshape(b, h, w, 36).permute(0, 3, 1, 2))
        start += n
    losses = loss_fn(per_level_cls, per_level_box, cls_t, box_t, num_pos, num_classes=num_classes, alpha=0.25,
                     gamma=1.5, delta=0.1, box_loss_weight=50.0)
    flat_box = torch.cat([t.reshape(b, -1, 4)[..., [1, 0, 3, 2]] for t in box_t], 1)
    return flat_box, num_pos.sum(), losses


@pytest.mark.parametrize("boxes_kind", ["random", "anchor_aligned"])
def test_targets_and_losses_equal_effdets(boxes_kind):
    """This project's TargetAssigner and DetectionLoss (``box_mask="nonzero"``) against effdet's AnchorLabeler and loss
    on one batch (padding boxes, an image without boxes). Anchor-aligned boxes (each one an anchor, shifted along one
    axis or not at all) give box targets of exactly 0, which effdet leaves out of the box loss."""
    effdet = pytest.importorskip("effdet")
    from heads import AnchorGenerator, BoxCoder, IoUMatcher, TargetAssigner

    g = torch.Generator().manual_seed(0)
    hw, c, n = (256, 384), 5, 12
    shapes = {f"p{level}": (hw[0] // 2**level, hw[1] // 2**level) for level in range(3, 8)}
    anchors = AnchorGenerator(anchor_scale=4.0)(shapes)
    if boxes_kind == "random":
        xy = torch.rand(3, n, 2, generator=g) * torch.tensor([hw[1], hw[0]]) * 0.7
        boxes = torch.cat([xy, xy + torch.rand(3, n, 2, generator=g) * 100 + 8], -1)
    else:
        inside = ((anchors[:, :2] >= 0) & (anchors[:, 2:] <= torch.tensor([hw[1], hw[0]]))).all(1).nonzero()[:, 0]
        boxes = anchors[inside[torch.randint(len(inside), (3, n), generator=g)]].clone()
        boxes[:, ::2, 0::2] += 3.0  # every other box moved along x: its y target and size targets stay exactly 0
    labels = torch.randint(0, c, (3, n), generator=g)
    labels[0, 8:] = -1  # padding
    labels[2] = -1  # an image without boxes
    a = anchors.shape[0]
    cls = torch.randn(3, a, c, generator=g) * 2 - 2
    box = torch.randn(3, a, 4, generator=g) * 0.3

    ref_box_t, ref_pos, ref = _effdet_targets_and_loss(effdet, hw, boxes, labels, cls, box, c)
    assigner = TargetAssigner(matcher=IoUMatcher(threshold=0.5, allow_low_quality=True, impl="torch"),
                              box_coder=BoxCoder())
    cls_t, box_t, num_pos = assigner(anchors, boxes, labels)
    positive = cls_t >= 0
    assert int(num_pos) == int(ref_pos) > 0
    torch.testing.assert_close(box_t[positive], ref_box_t[positive], rtol=0, atol=2e-6)
    if boxes_kind == "anchor_aligned":
        assert (box_t[positive] == 0).sum() > int(num_pos)  # the case that matters: many exact zeros
    ours = DetectionLoss(num_classes=c, focal_impl="torch", box_mask="nonzero")(cls, box, cls_t, box_t, num_pos)
    for name, value in zip(("loss", "cls_loss", "box_loss"), ref):
        torch.testing.assert_close(ours[name], value.float(), rtol=2e-6, atol=0, msg=name)
    # The default box mask counts the zero targets too: the same where there are none, more where there are.
    default = DetectionLoss(num_classes=c, focal_impl="torch")(cls, box, cls_t, box_t, num_pos)
    if boxes_kind == "random":
        torch.testing.assert_close(default["box_loss"], ours["box_loss"], rtol=2e-6, atol=0)
    else:
        assert default["box_loss"] > ours["box_loss"]
