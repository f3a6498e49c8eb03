"""box_iou, IoUMatcher and TargetAssigner on hand-made examples."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from heads.box_coder import BoxCoder
from heads.matcher import IoUMatcher, TargetAssigner, box_iou


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
    b = torch.tensor(
        [
            [1.0, 1.0, 3.0, 3.0],  # overlaps a0 by 1 -> 1 / (4 + 4 - 1); inside a1 -> 4 / 16
            [0.0, 0.0, 2.0, 2.0],  # equals a0; a1 contains it -> 4 / 16
            [2.0, 0.0, 4.0, 2.0],  # touches a0's edge -> 0; inside a1 -> 4 / 16
            [10.0, 10.0, 12.0, 12.0],  # disjoint from both
        ]
    )
    expected = torch.tensor([[1 / 7, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.0]])
    torch.testing.assert_close(box_iou(a, b), expected)


def test_box_iou_zero_area_boxes_give_zero_not_nan():
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    line = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    inverted = torch.tensor([[5.0, 5.0, 1.0, 1.0]])  # x2 < x1: zero area
    boxes = torch.cat([point, line, inverted, torch.tensor([[0.0, 0.0, 10.0, 10.0]])])
    iou = box_iou(boxes, boxes)
    assert not torch.isnan(iou).any()
    expected = torch.zeros(4, 4)
    expected[3, 3] = 1.0
    assert torch.equal(iou, expected)
    assert box_iou(torch.zeros(0, 4), boxes).shape == (0, 4)


def test_box_iou_batched_matches_torchvision():
    g = torch.Generator().manual_seed(0)

    def rand_boxes(*shape):
        xy = torch.rand(*shape, 2, generator=g) * 50
        return torch.cat([xy, xy + torch.rand(*shape, 2, generator=g) * 30 + 1], -1)

    a, b = rand_boxes(3, 7), rand_boxes(3, 11)
    iou = box_iou(a, b)
    assert iou.shape == (3, 7, 11)
    for i in range(3):
        torch.testing.assert_close(iou[i], torchvision.ops.box_iou(a[i], b[i]))
    # Leading dims broadcast: [3, 7, 4] against [1, 11, 4].
    torch.testing.assert_close(box_iou(a, b[:1]), torch.stack([torchvision.ops.box_iou(x, b[0]) for x in a]))
    assert box_iou(a.half(), b.half()).dtype == torch.float32


# One image, 3 ground truths (rows) x 5 anchors (columns).
IOU = torch.tensor(
    [
        [
            [0.70, 0.30, 0.10, 0.00, 0.45],
            [0.60, 0.20, 0.55, 0.00, 0.35],
            [0.00, 0.40, 0.05, 0.00, 0.00],
        ]
    ]
)
VALID = torch.tensor([[True, True, True]])


def test_threshold_background_and_ignore():
    # Anchor-wise best: a0 -> gt0 (0.70), a1 -> gt2 (0.40), a2 -> gt1 (0.55), a3 -> none, a4 -> gt0 (0.45).
    m = IoUMatcher(threshold=0.5, allow_low_quality=False)(IOU, VALID)
    assert m.dtype == torch.int64
    assert m.tolist() == [[0, -1, 1, -1, -1]]
    m = IoUMatcher(threshold=0.5, low_threshold=0.4, allow_low_quality=False)(IOU, VALID)
    assert m.tolist() == [[0, -2, 1, -1, -2]]  # 0.40 and 0.45 are in [0.4, 0.5)
    m = IoUMatcher(threshold=0.5, low_threshold=0.5, allow_low_quality=False)(IOU, VALID)
    assert m.tolist() == [[0, -1, 1, -1, -1]]  # empty ignore band
    # IoU exactly at the threshold matches.
    m = IoUMatcher(threshold=0.55, allow_low_quality=False)(IOU, VALID)
    assert m.tolist() == [[0, -1, 1, -1, -1]]


def test_low_quality_forced_match_overrides_ignore():
    # gt2's best anchor is a1 (0.40 < 0.5): forced to gt2 even though it would be ignored by the band.
    # gt0's best is a0 and gt1's best is a0 too (0.60): both claim a0, the lower index (gt0) wins.
    m = IoUMatcher(threshold=0.5, low_threshold=0.4, allow_low_quality=True)(IOU, VALID)
    assert m.tolist() == [[0, 2, 1, -1, -2]]


def test_claim_conflict_lowest_gt_index_wins_and_forced_overrides_better_match():
    # gt0 and gt1 both have their best anchor at a1 (0.30 and 0.40, both below threshold):
    # the lower ground-truth index wins even though gt1's IoU is higher.
    iou = torch.tensor([[[0.10, 0.30, 0.00], [0.05, 0.40, 0.00]]])
    m = IoUMatcher(threshold=0.5)(iou, torch.tensor([[True, True]]))
    assert m.tolist() == [[-1, 0, -1]]
    # a0's own best is gt0 (0.90 >= 0.5) but gt1 claims a0 as its single best anchor: the claim wins.
    iou = torch.tensor([[[0.90, 0.95], [0.60, 0.10]]])
    valid = torch.tensor([[True, True]])
    assert IoUMatcher(threshold=0.5)(iou, valid).tolist() == [[1, 0]]
    assert IoUMatcher(threshold=0.5, allow_low_quality=False)(iou, valid).tolist() == [[0, 0]]
    # Ties inside one gt's row: only the first (lowest-index) best anchor is claimed.
    iou = torch.tensor([[[0.0, 0.3, 0.3]]])
    assert IoUMatcher(threshold=0.5)(iou, torch.tensor([[True]])).tolist() == [[-1, 0, -1]]


def test_ground_truth_without_overlap_claims_nothing():
    iou = torch.tensor([[[0.0, 0.0, 0.0], [0.2, 0.0, 0.0]]])
    m = IoUMatcher(threshold=0.5)(iou, torch.tensor([[True, True]]))
    assert m.tolist() == [[1, -1, -1]]  # gt0 overlaps nothing, so it does not grab anchor 0


def test_padding_never_matches_and_empty_images():
    iou = torch.tensor(
        [
            [[0.9, 0.0, 0.3], [0.95, 0.8, 0.6]],  # gt1 is padding although it has the higher IoUs
            [[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]],  # all padding
        ]
    )
    valid = torch.tensor([[True, False], [False, False]])
    for low in (None, 0.1):
        m = IoUMatcher(threshold=0.5, low_threshold=low)(iou, valid)
        assert m[1].tolist() == [-1, -1, -1]
        assert m[0].tolist() == ([0, -1, -1] if low is None else [0, -1, -2])
    # No ground-truth column at all.
    m = IoUMatcher()(torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.bool))
    assert m.shape == (2, 5) and m.dtype == torch.int64 and (m == -1).all()


def test_batch_is_the_same_as_one_image_at_a_time():
    g = torch.Generator().manual_seed(3)
    iou = torch.rand(4, 6, 40, generator=g) * 0.8
    valid = torch.rand(4, 6, generator=g) > 0.3
    matcher = IoUMatcher(threshold=0.5, low_threshold=0.4)
    batched = matcher(iou, valid)
    for i in range(4):
        assert torch.equal(batched[i : i + 1], matcher(iou[i : i + 1], valid[i : i + 1]))
    # And every valid gt that overlaps something owns its best anchor.
    for i in range(4):
        for j in torch.nonzero(valid[i]).flatten().tolist():
            best = iou[i, j].argmax().item()
            owner = batched[i, best].item()
            assert owner <= j and valid[i, owner]


def test_matcher_invalid_arguments():
    with pytest.raises(ValueError):
        IoUMatcher(threshold=0.0)
    with pytest.raises(ValueError):
        IoUMatcher(threshold=0.5, low_threshold=0.6)
    with pytest.raises(ValueError):
        IoUMatcher()(torch.zeros(2, 5), torch.zeros(2, dtype=torch.bool))


def test_target_assigner_by_hand():
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [0.0, 10.0, 10.0, 20.0], [30.0, 30.0, 40.0, 40.0]]
    )
    gt_boxes = torch.tensor(
        [
            # image 0: an exact copy of anchor 0 (class 3); a box over anchor 1 with IoU 100 / 120 (class 5);
            # a padding row that coincides with anchor 3 and must be ignored.
            [[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 12.0], [30.0, 30.0, 40.0, 40.0]],
            # image 1: padding only.
            [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    gt_labels = torch.tensor([[3, 5, -1], [-1, -1, -1]])
    assigner = TargetAssigner(matcher=IoUMatcher(threshold=0.5), box_coder=BoxCoder())
    cls_t, box_t, npos = assigner(anchors, gt_boxes, gt_labels)
    assert cls_t.dtype == torch.int64 and box_t.dtype == torch.float32
    assert cls_t.tolist() == [[3, 5, -1, -1], [-1, -1, -1, -1]]
    assert npos.shape == () and npos.item() == 2.0
    # Anchor 1 -> box [10, 0, 20, 12]: centre (15, 6) vs (15, 5), size 10 x 12 vs 10 x 10.
    expected = torch.zeros(2, 4, 4)
    expected[0, 1] = torch.tensor([0.0, 0.1, 0.0, math.log(1.2)])
    torch.testing.assert_close(box_t, expected)


def test_target_assigner_ignore_band_and_no_ground_truth():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [50.0, 50.0, 60.0, 60.0]])
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])  # anchor 1 has IoU 0.5 with it
    assigner = TargetAssigner(matcher=IoUMatcher(threshold=0.6, low_threshold=0.4), box_coder=BoxCoder())
    cls_t, box_t, npos = assigner(anchors, gt, torch.tensor([[7]]))
    assert cls_t.tolist() == [[7, -2, -1]] and npos.item() == 1.0
    assert box_t.abs().sum().item() == 0.0  # the positive anchor equals its box: zero deltas
    # G == 0 (an empty second dimension).
    cls_t, box_t, npos = assigner(anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long))
    assert cls_t.tolist() == [[-1, -1, -1]] * 2
    assert box_t.shape == (2, 3, 4) and box_t.dtype == torch.float32 and npos.item() == 0.0
