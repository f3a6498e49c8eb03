"""Detection post-processing: top-k, decode, clip, class-wise NMS, fixed-size output; no per-image loop."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from .box_coder import BoxCoder

__all__ = ["DetectionPostProcess"]


class DetectionPostProcess:
    """Turns flat class logits ``[B, A, C]`` and box deltas ``[B, A, 4]`` into at most ``max_detections``
    boxes per image.

    Per image the ``topk`` highest (anchor, class) logits are decoded (and clipped to the image), scored
    by sigmoid, filtered by ``score_threshold`` (scores ``>= score_threshold`` are kept) and suppressed
    class-wise at ``iou_threshold``: a box is dropped only when its IoU with a kept higher-scoring box of
    the same class is strictly greater than ``iou_threshold`` (IoU exactly equal survives). NMS runs once
    for the whole batch, each (image, class) pair being its own group (``image * C + class``); the first
    ``max_detections`` survivors of each image are then scattered into the padded output.

    Returns ``boxes [B, D, 4]`` (xyxy, float32), ``scores [B, D]``, ``labels [B, D]`` (-1 for padding),
    ``num_detections [B]``; rows are sorted by score and padded with zeros.
    """

    def __init__(
        self,
        *,
        box_coder: BoxCoder,
        topk: int = 5000,
        score_threshold: float = 0.0,
        iou_threshold: float = 0.5,
        max_detections: int = 100,
        clip_boxes: bool = True,
    ) -> None:
        if topk < 1 or max_detections < 1:
            raise ValueError(f"topk and max_detections must be >= 1, got {topk} and {max_detections}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        self.box_coder = box_coder
        self.topk = topk
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections
        self.clip_boxes = clip_boxes

    @torch.no_grad()
    def __call__(
        self,
        cls_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        anchors: torch.Tensor,
        image_size: tuple[int, int] | torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``image_size`` is the clip region: one ``(H, W)`` for the batch or a ``[B, 2]`` tensor per image
        (e.g. the un-padded part of a letterboxed input)."""
        b, a, c = cls_logits.shape
        device = cls_logits.device
        k = min(self.topk, a * c)
        top_logits, top_idx = cls_logits.reshape(b, -1).float().topk(k, dim=1)  # [B, k], sorted
        anchor_idx = top_idx // c
        labels = top_idx % c
        deltas = torch.gather(box_deltas.float(), 1, anchor_idx[..., None].expand(-1, -1, 4))
        boxes = self.box_coder.decode(deltas, anchors.float()[anchor_idx])  # [B, k, 4]
        if self.clip_boxes:
            hw = torch.as_tensor(image_size, dtype=boxes.dtype, device=device).reshape(-1, 2)
            upper = hw.flip(-1).repeat(1, 2)[:, None, :]  # [B or 1, 1, 4]: (w, h, w, h)
            boxes = torch.minimum(boxes.clamp(min=0), upper)
        scores = torch.sigmoid(top_logits)
        image_idx = torch.arange(b, device=device)[:, None].expand(b, k)

        flat_boxes, flat_scores = boxes.reshape(-1, 4), scores.reshape(-1)
        flat_labels, flat_images = labels.reshape(-1), image_idx.reshape(-1)
        if self.score_threshold > 0:
            candidates = torch.nonzero(flat_scores >= self.score_threshold).squeeze(1)
            flat_boxes, flat_scores = flat_boxes[candidates], flat_scores[candidates]
            flat_labels, flat_images = flat_labels[candidates], flat_images[candidates]
        keep = batched_nms(flat_boxes, flat_scores, flat_images * c + flat_labels, self.iou_threshold)
        # `keep` is sorted by score over the whole batch; sorting by (image, position in `keep`) -- unique keys,
        # so no stable sort is needed -- groups it by image and keeps the score order within each image.
        position = torch.arange(keep.numel(), device=device)
        keep = keep[torch.sort(flat_images[keep] * keep.numel() + position).indices]
        kept_images = flat_images[keep]
        # Detections per image (a comparison table rather than bincount, which ONNX export lacks).
        counts = (kept_images[:, None] == torch.arange(b, device=device)[None, :]).sum(0)
        starts = torch.cumsum(counts, 0) - counts
        rank = position - starts[kept_images]
        sel = rank < self.max_detections
        keep, kept_images, rank = keep[sel], kept_images[sel], rank[sel]

        d = self.max_detections
        out_boxes = torch.zeros(b, d, 4, device=device)
        out_scores = torch.zeros(b, d, device=device)
        out_labels = torch.full((b, d), -1, dtype=torch.long, device=device)
        out_boxes[kept_images, rank] = flat_boxes[keep]
        out_scores[kept_images, rank] = flat_scores[keep]
        out_labels[kept_images, rank] = flat_labels[keep]
        return {
            "boxes": out_boxes,
            "scores": out_scores,
            "labels": out_labels,
            "num_detections": counts.clamp(max=d),
        }
