"""A reference greedy NMS for the tests: batched, pairwise, written for clarity, not speed."""

from __future__ import annotations

import torch


def dense_greedy_nms(
    boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Class-wise greedy NMS of score-sorted candidates, for a batch at once: ``boxes [B, n, 4]`` (xyxy),
    ``labels [B, n]``, ``valid [B, n]`` -> ``keep [B, n]``.

    Candidate ``i`` is kept when valid and no kept earlier candidate ``j < i`` of its class overlaps it with
    IoU > ``iou_threshold`` (IoU computed as :func:`torchvision.ops.nms` does, so decisions are identical).
    That rule defines ``keep`` uniquely (by induction over ``i``), so ``keep`` is found as the fixed point of
    ``keep <- valid & ~any_j(suppresses[i, j] & keep[j])`` starting from ``valid``: after ``t`` rounds the first
    ``t`` candidates are final, and in practice it settles after a few rounds (the longest suppression chain).
    """
    n = boxes.shape[1]
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp(min=0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp(min=0)
    inter = w * h
    iou = inter / (area[:, :, None] + area[:, None, :] - inter)
    earlier = torch.ones(n, n, dtype=torch.bool, device=boxes.device).tril(-1)  # [i, j]: j < i
    suppresses = (iou > iou_threshold) & (labels[:, :, None] == labels[:, None, :]) & earlier & valid[:, None, :]
    del w, h, inter, iou

    def step(keep: torch.Tensor) -> torch.Tensor:
        return valid & ~(suppresses & keep[:, None, :]).any(-1)

    keep = valid
    for _ in range(n // 2 + 1):  # n rounds make every candidate final
        once = step(keep)
        twice = step(once)
        if torch.equal(once, twice):  # `once` is the fixed point (one host synchronisation per two rounds)
            return once
        keep = twice
    return keep
