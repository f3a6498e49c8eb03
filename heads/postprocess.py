"""Detection post-processing: top-k, decode, clip, class-wise NMS (greedy or Gaussian soft-NMS), fixed-size output;
no per-image loop."""

from __future__ import annotations

import torch

from layers.kernels.dispatch import tracing as _tracing
from layers.kernels.dispatch import use_kernel
from layers.nms import grouped_nms, ranked_topk, soft_nms

from .box_coder import BoxCoder

__all__ = ["DetectionPostProcess"]


class DetectionPostProcess:
    """Turns flat class logits ``[B, A, C]`` and box deltas ``[B, A, 4]`` into at most ``max_detections``
    boxes per image.

    Per image the ``topk`` highest (anchor, class) logits are decoded (and clipped to the image), scored
    by sigmoid, filtered by ``score_threshold`` (scores ``>= score_threshold`` are kept) and suppressed
    class-wise at ``iou_threshold``: a box is dropped only when its IoU with a kept higher-scoring box of
    the same class is strictly greater than ``iou_threshold`` (IoU exactly equal survives; IoUs in float32;
    a NaN score is never kept). Each (image, class) pair is its own group (``image * C + class``); the first
    ``max_detections`` survivors of each image are then scattered into the padded output.

    ``nms_prefix``: NMS first runs on the best ``nms_prefix`` candidates of each image only, and on 4x more
    until every image has ``max_detections`` survivors or no candidates left. Greedy NMS decides each box
    from higher-scoring boxes alone, so the output is the same as NMS over all ``topk`` candidates, at a
    fraction of the cost (``None``: always all ``topk``; exported graphs always use all of them). Equal scores
    too: candidates are ranked as a stable sort would rank them (equal logits by index), so a prefix is always
    the beginning of the full ranking.

    ``nms_impl``: ``"torchvision"`` runs :func:`torchvision.ops.nms` once per (image, class) pair present among
    the candidates (once over the batch in traced graphs, every pair moved to its own region of the plane);
    ``"triton"`` runs
    :func:`layers.kernels.nms.greedy_nms_scan`, one GPU program per image that walks its candidates in score order
    and stops at ``max_detections`` kept (no pairwise matrix, no prefix, no host synchronisation: the whole
    post-processing can be captured in a CUDA graph). ``"auto"`` picks triton on CUDA (torchvision where the
    kernel cannot run) and torchvision elsewhere. Both give the same detections.

    ``nms``: ``"hard"`` is the greedy NMS above. ``"soft"`` is Gaussian soft-NMS (:func:`layers.nms.soft_nms`,
    effdet's ``soft_nms``): instead of dropping a box that overlaps a kept higher-scoring box of its class, its score
    is multiplied by ``exp(-IoU**2 / soft_nms_sigma)``; boxes are taken in order of their decayed scores, and a box
    leaves once its decayed score is no longer above ``soft_nms_score_threshold`` (or falls below
    ``score_threshold``). ``iou_threshold``, ``nms_prefix`` and ``nms_impl`` apply to hard NMS only; soft-NMS runs
    over all ``topk`` candidates, ``max_detections`` rounds, on every device and in exported graphs.

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
        nms_prefix: int | None = 512,
        nms_impl: str = "auto",
        nms: str = "hard",
        soft_nms_sigma: float = 0.5,
        soft_nms_score_threshold: float = 0.001,
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
        if nms_prefix is not None and nms_prefix < 1:
            raise ValueError(f"nms_prefix must be >= 1 or None, got {nms_prefix}")
        self.nms_prefix = nms_prefix
        if nms_impl not in ("auto", "torchvision", "triton"):
            raise ValueError(f"nms_impl must be auto, torchvision or triton, got {nms_impl!r}")
        self.nms_impl = nms_impl
        if nms not in ("hard", "soft"):
            raise ValueError(f"nms must be hard or soft, got {nms!r}")
        if nms == "soft" and nms_impl == "triton":
            raise ValueError("nms_impl=triton is a hard-NMS kernel; soft-NMS has one implementation (nms_impl=auto)")
        if not soft_nms_sigma > 0:
            raise ValueError(f"soft_nms_sigma must be positive, got {soft_nms_sigma}")
        if not 0.0 <= soft_nms_score_threshold < 1.0:
            raise ValueError(f"soft_nms_score_threshold must be in [0, 1), got {soft_nms_score_threshold}")
        self.nms = nms
        self.soft_nms_sigma = float(soft_nms_sigma)
        self.soft_nms_score_threshold = float(soft_nms_score_threshold)

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
        _, a, c = cls_logits.shape
        k = min(self.topk, a * c)
        if self.nms == "soft":
            top_logits, top_idx = ranked_topk(cls_logits, k)
            return self._soft_nms(torch.sigmoid(top_logits.float()), top_idx, box_deltas, anchors, image_size, c)
        # Greedy NMS decides a candidate's fate from higher-scoring candidates only, so NMS over the best n
        # candidates gives exactly the survivors among them. Once every image has max_detections survivors
        # (or has run out of candidates) the rest cannot change the output: try a prefix, widen it if needed.
        # Only the best n are ranked (top-k of a few hundred, not of thousands, out of millions of logits).
        # The kernel walks the candidates only until it has max_detections: all k at once, no widening (and no
        # host synchronisation to decide one).
        full = self.nms_prefix is None or _tracing() or self._impl(cls_logits.device) == "triton"
        n = k if full else min(k, max(self.nms_prefix, self.max_detections))
        while True:
            # Ranking in the logits' own dtype avoids a float32 copy of the whole [B, A*C] map under bf16.
            top_logits, top_idx = ranked_topk(cls_logits, n)  # [B, n], sorted
            top_scores = torch.sigmoid(top_logits.float())
            out = self._nms(top_scores, top_idx, box_deltas, anchors, image_size, c)
            if n == k:
                return out
            # An image whose n-th candidate already fails the score threshold has no more candidates to offer.
            exhausted = top_scores[:, -1] < self.score_threshold
            if bool(((out["num_detections"] >= self.max_detections) | exhausted).all()):
                return out
            n = min(k, 4 * n)

    def _decode(self, scores, top_idx, box_deltas, anchors, image_size, c) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes ``[B, k, 4]`` (decoded, clipped) and labels ``[B, k]`` of the ranked candidates ``top_idx``."""
        device = scores.device
        anchor_idx = top_idx // c
        labels = top_idx % c
        deltas = torch.gather(box_deltas, 1, anchor_idx[..., None].expand(-1, -1, 4)).float()
        boxes = self.box_coder.decode(deltas, anchors.float()[anchor_idx])  # [B, k, 4]
        if self.clip_boxes:
            if isinstance(image_size, torch.Tensor):
                hw = image_size.to(device=device, dtype=boxes.dtype).reshape(-1, 2)
                upper = hw.flip(-1).repeat(1, 2)[:, None, :]  # [B or 1, 1, 4]: (w, h, w, h)
                boxes = torch.minimum(boxes.clamp(min=0), upper)
            else:  # one size for the batch: plain numbers, no host-to-device copy
                h, w = (float(v) for v in image_size)
                boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                                     boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
        return boxes, labels

    def _soft_nms(self, scores, top_idx, box_deltas, anchors, image_size, c) -> dict[str, torch.Tensor]:
        boxes, labels = self._decode(scores, top_idx, box_deltas, anchors, image_size, c)
        # Below score_threshold from the start: never live (NaN is not above any threshold).
        scores = torch.where(scores >= self.score_threshold, scores, torch.nan)
        threshold = self.soft_nms_score_threshold
        index, taken = soft_nms(boxes, scores, labels, sigma=self.soft_nms_sigma, score_threshold=threshold,
                                max_detections=self.max_detections)
        if self.score_threshold > threshold:  # a decayed score may fall below score_threshold before threshold
            index = torch.where(taken >= self.score_threshold, index, -1)
        shown = index >= 0
        at = index.clamp(min=0)
        return {
            "boxes": torch.where(shown[..., None], torch.gather(boxes, 1, at[..., None].expand(-1, -1, 4)), 0.0),
            "scores": torch.where(shown, taken, 0.0),
            "labels": torch.where(shown, torch.gather(labels, 1, at), -1),
            "num_detections": shown.sum(1),
        }

    def _nms(self, scores, top_idx, box_deltas, anchors, image_size, c) -> dict[str, torch.Tensor]:
        b, k = scores.shape
        device = scores.device
        boxes, labels = self._decode(scores, top_idx, box_deltas, anchors, image_size, c)
        impl = self._impl(device)
        if impl == "triton":
            return self._kernel_output(boxes, scores, labels)
        image_idx = torch.arange(b, device=device)[:, None].expand(b, k)

        flat_boxes, flat_scores = boxes.reshape(-1, 4), scores.reshape(-1)
        flat_labels, flat_images = labels.reshape(-1), image_idx.reshape(-1)
        if self.score_threshold > 0 or not _tracing():  # NaN scores are never candidates, as in the other paths
            candidates = torch.nonzero(flat_scores >= self.score_threshold).squeeze(1)
            flat_boxes, flat_scores = flat_boxes[candidates], flat_scores[candidates]
            flat_labels, flat_images = flat_labels[candidates], flat_images[candidates]
        keep = grouped_nms(flat_boxes, flat_scores, flat_images * c + flat_labels, self.iou_threshold)
        # `keep` is in candidate order (traced: by score over the whole batch); sorting by (image, position in
        # `keep`) -- unique keys, so no stable sort is needed -- groups it by image in that order.
        position = torch.arange(keep.numel(), device=device)
        keep = keep[torch.sort(flat_images[keep] * keep.numel() + position).indices]
        kept_images = flat_images[keep]
        # Detections per image (a comparison table rather than bincount, which ONNX export lacks).
        counts = (kept_images[:, None] == torch.arange(b, device=device)[None, :]).sum(0)
        starts = torch.cumsum(counts, 0) - counts
        rank = position - starts[kept_images]
        sel = rank < self.max_detections
        keep, kept_images, rank = keep[sel], kept_images[sel], rank[sel]

        return _padded_detections(
            b, self.max_detections, kept_images, rank, flat_boxes[keep], flat_scores[keep], flat_labels[keep], counts
        )

    def capturable(self, device: torch.device | str) -> bool:
        """Whether post-processing on ``device`` never waits for the host, so it can be captured in a CUDA graph
        (fixed shapes, no prefix widening): the Triton NMS. Soft-NMS runs eagerly after the captured network: its
        rounds do not wait for the host on CUDA, but no test covers capturing them."""
        return self.nms == "hard" and self._impl(torch.device(device)) == "triton"

    def _impl(self, device: torch.device) -> str:
        if self.nms_impl not in ("auto", "triton"):
            return self.nms_impl
        # An exported graph cannot hold the kernel; auto keeps torchvision's NMS off CUDA.
        if _tracing() or (self.nms_impl == "auto" and device.type != "cuda"):
            return "torchvision"
        from layers.kernels import nms as nms_kernel

        fits = self.nms_impl == "triton" or self.max_detections <= nms_kernel.MAX_KEEP_LIMIT
        chosen = fits and use_kernel(self.nms_impl, device, nms_kernel, "nms_impl", "'auto' or 'torchvision'")
        return "triton" if chosen else "torchvision"

    def _kernel_output(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The first ``max_detections`` survivors of each image from :func:`layers.kernels.nms.greedy_nms_scan`,
        gathered into the padded output: fixed shapes, no host synchronisation."""
        from layers.kernels.nms import greedy_nms_scan

        # Scores are sorted (NaN first, as top-k ranks it): after the first score below the threshold, all are.
        index, count = greedy_nms_scan(boxes, labels, scores >= self.score_threshold, self.iou_threshold,
                                       self.max_detections, stop=scores < self.score_threshold)
        shown = index >= 0
        at = index.clamp(min=0)
        return {
            "boxes": torch.where(shown[..., None], torch.gather(boxes, 1, at[..., None].expand(-1, -1, 4)), 0.0),
            "scores": torch.where(shown, torch.gather(scores, 1, at), 0.0),
            "labels": torch.where(shown, torch.gather(labels, 1, at), -1),
            "num_detections": count,
        }


def _padded_detections(
    b: int, d: int, rows: torch.Tensor, slots: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
    labels: torch.Tensor, counts: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The output dict: detection ``i`` goes to row ``rows[i]``, column ``slots[i]`` (``< d`` is shown; column
    ``d`` is a spare that is cut off), padding is zeros with label -1."""
    device = boxes.device
    out_boxes = torch.zeros(b, d + 1, 4, device=device)
    out_scores = torch.zeros(b, d + 1, device=device)
    out_labels = torch.full((b, d + 1), -1, dtype=torch.long, device=device)
    out_boxes[rows, slots] = boxes
    out_scores[rows, slots] = scores
    out_labels[rows, slots] = labels
    return {
        "boxes": out_boxes[:, :d].contiguous(),
        "scores": out_scores[:, :d].contiguous(),
        "labels": out_labels[:, :d].contiguous(),
        "num_detections": counts.clamp(max=d),
    }
