"""Box geometry shared by matching and its kernel: pairwise IoU of xyxy boxes and its reductions."""

from __future__ import annotations

import torch

__all__ = ["box_iou", "matrix_reductions"]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes, ``[..., N, 4] x [..., M, 4] -> [..., N, M]`` (float32).

    Leading dimensions broadcast. Boxes with zero or negative width/height have zero area; a pair whose
    union is empty has IoU 0 (never NaN).
    """
    ax1, ay1, ax2, ay2 = a.float().unbind(-1)  # [..., N] each
    bx1, by1, bx2, by2 = b.float().unbind(-1)  # [..., M] each
    area_a = (ax2 - ax1).clamp(min=0) * (ay2 - ay1).clamp(min=0)
    area_b = (bx2 - bx1).clamp(min=0) * (by2 - by1).clamp(min=0)
    iw = torch.minimum(ax2[..., :, None], bx2[..., None, :]) - torch.maximum(
        ax1[..., :, None], bx1[..., None, :]
    )
    ih = torch.minimum(ay2[..., :, None], by2[..., None, :]) - torch.maximum(
        ay1[..., :, None], by1[..., None, :]
    )
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    # inter <= union, so inter is 0 wherever union is 0.
    return inter / torch.where(union > 0, union, torch.ones_like(union))


def matrix_reductions(
    iou: torch.Tensor, gt_valid: torch.Tensor, *, per_gt: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``iou [B, G, A]``, ``gt_valid [B, G]`` (bool, on ``iou``'s device) -> each anchor's best IoU and ground truth
    ``[B, A]`` and, with ``per_gt``, each ground truth's best IoU and anchor ``[B, G]`` (else None): the first index
    on ties. Invalid ground truths count with IoU -1: below every threshold, and never an anchor's best."""
    iou = iou.float().masked_fill(~gt_valid[..., None], -1.0)
    best_iou, best_gt = iou.max(dim=1)
    return (best_iou, best_gt, *iou.max(dim=2)) if per_gt else (best_iou, best_gt, None, None)
