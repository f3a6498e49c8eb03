"""IoU, anchor-to-ground-truth matching and training-target assignment, vectorised over the batch."""

from __future__ import annotations

import torch

from layers.boxes import box_iou, matrix_reductions

from .box_coder import BoxCoder

__all__ = ["BACKGROUND", "IGNORE", "IoUMatcher", "TargetAssigner", "box_iou"]

#: Match / class-target value of an anchor that is background.
BACKGROUND = -1
#: Match / class-target value of an anchor that the loss ignores.
IGNORE = -2


class IoUMatcher:
    """Assigns every anchor to its best valid ground truth by IoU.

    Rules, for each image independently:

    1. An anchor takes the valid ground truth with the highest IoU (the lowest index on ties); it is
       matched when that IoU is ``>= threshold``.
    2. Otherwise it is ignored (:data:`IGNORE`, -2) when ``low_threshold`` is set and the IoU is
       ``>= low_threshold``, else background (:data:`BACKGROUND`, -1).
    3. With ``allow_low_quality`` every valid ground truth that overlaps some anchor (best IoU > 0) also
       claims its single best anchor (the lowest anchor index on ties). A claimed anchor is forced to the
       claiming ground truth whatever rules 1-2 decided; when several ground truths claim the same anchor,
       the one with the LOWEST ground-truth index wins (the others keep only what rule 1 gives them).

    Padded ground truths (``gt_valid`` False) never match; an image without valid ones is all background.

    ``impl`` chooses how :meth:`match` finds the best IoUs from the boxes: ``"torch"`` builds the ``[B, G, A]`` IoU
    matrix (:func:`box_iou`) and reduces it; ``"triton"`` computes them in one kernel without the matrix
    (:func:`layers.kernels.matching.iou_reductions`, the same values); ``"auto"`` uses the kernel on CUDA once a first run
    there matched PyTorch's answer, and PyTorch elsewhere and while tracing or compiling. The default is ``"torch"``
    (a fast path is on by default only where a measurement shows it pays: docs/benchmarks.md). Calling the
    matcher on a ready IoU matrix (``matcher(iou, gt_valid)``) always uses PyTorch.
    """

    def __init__(
        self, *, threshold: float = 0.5, low_threshold: float | None = None, allow_low_quality: bool = True,
        impl: str = "torch",
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if low_threshold is not None and not 0.0 <= low_threshold <= threshold:
            raise ValueError(
                f"low_threshold must be None or in [0, threshold={threshold}], got {low_threshold}"
            )
        self.threshold = float(threshold)
        self.low_threshold = None if low_threshold is None else float(low_threshold)
        self.allow_low_quality = bool(allow_low_quality)
        if impl not in ("auto", "torch", "triton"):
            raise ValueError(f"impl must be auto, torch or triton, got {impl!r}")
        self.impl = impl

    def backend(self, device: torch.device) -> str:
        """How :meth:`match` finds the best IoUs for boxes on ``device``: ``"triton"``
        (:func:`layers.kernels.matching.iou_reductions`, no IoU matrix) or ``"torch"`` (:func:`box_iou`'s ``[B, G, A]``
        matrix and its reductions); see ``impl``."""
        from layers.kernels import matching as match_kernel
        from layers.kernels.dispatch import tracing, use_kernel

        if self.impl == "torch" or tracing():
            return "torch"
        return "triton" if use_kernel(self.impl, device, match_kernel, "impl", "'auto' or 'torch'") else "torch"

    def match(self, gt_boxes: torch.Tensor, anchors: torch.Tensor, gt_valid: torch.Tensor) -> torch.Tensor:
        """``gt_boxes [B, G, 4]`` (xyxy), ``anchors [A, 4]`` (xyxy), ``gt_valid [B, G]`` (bool) -> ``[B, A]``
        int64: gt index, -1 or -2; the same as ``self(box_iou(gt_boxes, anchors[None]), gt_valid)``."""
        from layers.kernels import matching as match_kernel

        if type(self).__call__ is not IoUMatcher.__call__:  # a subclass with rules of its own keeps them
            return self(box_iou(gt_boxes, anchors[None]), gt_valid)
        b, g = gt_valid.shape
        a = anchors.shape[0]
        if g == 0 or a == 0:
            return torch.full((b, a), BACKGROUND, dtype=torch.long, device=anchors.device)
        valid = gt_valid.to(device=anchors.device, dtype=torch.bool)
        reduce = match_kernel.iou_reductions if self.backend(anchors.device) == "triton" else match_kernel.reference
        return self._decide(*reduce(gt_boxes, anchors, valid, per_gt=self.allow_low_quality), valid)

    def __call__(self, iou: torch.Tensor, gt_valid: torch.Tensor) -> torch.Tensor:
        """``iou [B, G, A]``, ``gt_valid [B, G]`` (bool) -> ``[B, A]`` int64: gt index, -1 or -2."""
        if iou.dim() != 3 or gt_valid.shape != iou.shape[:2]:
            raise ValueError(
                f"expected iou [B, G, A] and gt_valid [B, G], got {tuple(iou.shape)} and "
                f"{tuple(gt_valid.shape)}"
            )
        b, g, a = iou.shape
        if g == 0 or a == 0:
            return torch.full((b, a), BACKGROUND, dtype=torch.long, device=iou.device)
        valid = gt_valid.to(device=iou.device, dtype=torch.bool)
        return self._decide(*matrix_reductions(iou, valid, per_gt=self.allow_low_quality), valid)

    def _decide(self, best_iou: torch.Tensor, best_gt: torch.Tensor, gt_best_iou: torch.Tensor | None,
                gt_best_anchor: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        """The rules, from each anchor's best IoU and gt ``[B, A]`` and each gt's best IoU and anchor ``[B, G]``."""
        (b, a), g = best_iou.shape, valid.shape[1]
        matches = torch.where(best_iou >= self.threshold, best_gt, torch.full_like(best_gt, BACKGROUND))
        if self.low_threshold is not None:
            between = (best_iou >= self.low_threshold) & (best_iou < self.threshold)
            matches = torch.where(between, torch.full_like(matches, IGNORE), matches)
        if self.allow_low_quality:
            claims = valid & (gt_best_iou > 0)
            # Each claiming gt writes its index at its best anchor; "amin" makes the lowest index win (and
            # is order-independent, so deterministic on every device). Non-claimers write the sentinel g.
            gt_ids = torch.arange(g, device=best_iou.device).expand(b, g)
            src = torch.where(claims, gt_ids, torch.full_like(gt_ids, g))
            forced_gt = torch.full((b, a), g, dtype=torch.long, device=best_iou.device)
            forced_gt = forced_gt.scatter_reduce(1, gt_best_anchor, src, reduce="amin")
            matches = torch.where(forced_gt < g, forced_gt, matches)
        return matches

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(threshold={self.threshold}, low_threshold={self.low_threshold}, "
            f"allow_low_quality={self.allow_low_quality}, impl={self.impl!r})"
        )


class TargetAssigner:
    """Ground truth -> per-anchor class targets and encoded box targets, for the whole batch at once."""

    def __init__(self, *, matcher: IoUMatcher, box_coder: BoxCoder) -> None:
        self.matcher = matcher
        self.box_coder = box_coder

    def __call__(
        self, anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``anchors [A, 4]``, ``gt_boxes [B, G, 4]`` (xyxy), ``gt_labels [B, G]`` (-1 = padding) ->

        - ``cls_targets [B, A]`` int64: the matched class for positives, -1 background, -2 ignored;
        - ``box_targets [B, A, 4]`` float32: encoded deltas for positives, zeros elsewhere;
        - ``num_positives``: scalar float32, positives summed over the batch.

        Everything is produced on ``anchors.device``.
        """
        if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4 or gt_labels.shape != gt_boxes.shape[:2]:
            raise ValueError(
                f"expected gt_boxes [B, G, 4] and gt_labels [B, G], got {tuple(gt_boxes.shape)} "
                f"and {tuple(gt_labels.shape)}"
            )
        b, g = gt_labels.shape
        a = anchors.shape[0]
        device = anchors.device
        if g == 0:
            cls_t = torch.full((b, a), BACKGROUND, dtype=torch.long, device=device)
            return cls_t, torch.zeros(b, a, 4, device=device), torch.zeros((), device=device)
        anchors = anchors.float()
        gt_boxes = gt_boxes.to(device=device, dtype=torch.float32)
        gt_labels = gt_labels.to(device=device, dtype=torch.long)
        valid = gt_labels >= 0
        match = getattr(self.matcher, "match", None)  # from the boxes (IoUMatcher: without the IoU matrix on CUDA)
        matches = match(gt_boxes, anchors, valid) if match else self.matcher(box_iou(gt_boxes, anchors[None]), valid)
        positive = matches >= 0
        idx = matches.clamp(min=0)
        matched_boxes = torch.gather(gt_boxes, 1, idx[..., None].expand(-1, -1, 4))  # [B, A, 4]
        matched_labels = torch.gather(gt_labels, 1, idx)  # [B, A]
        cls_t = torch.where(positive, matched_labels, matches)
        deltas = self.box_coder.encode(matched_boxes, anchors[None])
        box_t = torch.where(positive[..., None], deltas, torch.zeros_like(deltas))
        return cls_t, box_t, positive.sum().float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(matcher={self.matcher!r}, box_coder={self.box_coder!r})"
