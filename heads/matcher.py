"""IoU, anchor-to-ground-truth matching and training-target assignment, vectorised over the batch."""

from __future__ import annotations

import torch

from .box_coder import BoxCoder

__all__ = ["box_iou", "IoUMatcher", "TargetAssigner", "BACKGROUND", "IGNORE"]

BACKGROUND = -1
IGNORE = -2


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: ``[..., N, 4] x [..., M, 4] -> [..., N, M]``; zero-area pairs give 0."""
    a, b = a.float(), b.float()
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter / union.clamp(min=eps)


class IoUMatcher:
    """Assigns every anchor to its best ground truth by IoU.

    An anchor is matched when its best IoU is ``>= threshold``; with ``low_threshold`` set, a best IoU in
    ``[low_threshold, threshold)`` marks it ignored (-2), below is background (-1). With
    ``allow_low_quality`` every valid ground truth also claims its single best anchor (if that IoU is
    positive), overriding the anchor's own assignment; when several ground truths claim one anchor the
    lowest ground-truth index wins.
    """

    def __init__(
        self, *, threshold: float = 0.5, low_threshold: float | None = None, allow_low_quality: bool = True
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if low_threshold is not None and not 0.0 <= low_threshold <= threshold:
            raise ValueError(f"low_threshold must be in [0, threshold], got {low_threshold}")
        self.threshold = threshold
        self.low_threshold = low_threshold
        self.allow_low_quality = allow_low_quality

    def __call__(self, iou: torch.Tensor, gt_valid: torch.Tensor) -> torch.Tensor:
        """``iou [B, G, A]``, ``gt_valid [B, G]`` -> ``[B, A]`` gt index, -1 background or -2 ignore."""
        b, g, a = iou.shape
        if g == 0:
            return torch.full((b, a), BACKGROUND, dtype=torch.long, device=iou.device)
        iou = iou.masked_fill(~gt_valid[..., None], -1.0)
        best_iou, best_gt = iou.max(dim=1)  # [B, A]
        matches = torch.where(best_iou >= self.threshold, best_gt, torch.full_like(best_gt, BACKGROUND))
        if self.low_threshold is not None:
            between = (best_iou >= self.low_threshold) & (best_iou < self.threshold)
            matches = torch.where(between, torch.full_like(matches, IGNORE), matches)
        if self.allow_low_quality:
            gt_best_iou, gt_best_anchor = iou.max(dim=2)  # [B, G]
            claims = gt_valid & (gt_best_iou > 0)
            onehot = (torch.arange(a, device=iou.device) == gt_best_anchor[..., None]) & claims[..., None]  # [B,G,A]
            forced = onehot.any(dim=1)
            forced_gt = onehot.to(torch.uint8).argmax(dim=1)  # first (lowest) claiming gt
            matches = torch.where(forced, forced_gt, matches)
        return matches


class TargetAssigner:
    """Ground truth -> per-anchor class targets and encoded box targets for the whole batch."""

    def __init__(self, *, matcher: IoUMatcher, box_coder: BoxCoder) -> None:
        self.matcher = matcher
        self.box_coder = box_coder

    def __call__(
        self, anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``anchors [A, 4]``, ``gt_boxes [B, G, 4]``, ``gt_labels [B, G]`` (-1 = padding) ->
        ``cls_targets [B, A]`` (class, -1 background, -2 ignore), ``box_targets [B, A, 4]``, ``num_positives``."""
        b, g = gt_labels.shape
        a = anchors.shape[0]
        device = anchors.device
        if g == 0:
            cls_t = torch.full((b, a), BACKGROUND, dtype=torch.long, device=device)
            return cls_t, torch.zeros(b, a, 4, device=device), torch.zeros((), device=device)
        gt_boxes = gt_boxes.to(device=device, dtype=torch.float32)
        gt_labels = gt_labels.to(device)
        valid = gt_labels >= 0
        matches = self.matcher(box_iou(gt_boxes, anchors[None].float()), valid)
        positive = matches >= 0
        idx = matches.clamp(min=0)
        matched_boxes = torch.gather(gt_boxes, 1, idx[..., None].expand(-1, -1, 4))
        matched_labels = torch.gather(gt_labels, 1, idx)
        cls_t = torch.where(positive, matched_labels, matches)
        deltas = self.box_coder.encode(matched_boxes, anchors[None])
        box_t = torch.where(positive[..., None], deltas, torch.zeros_like(deltas))
        return cls_t, box_t, positive.sum().float()
