"""Segmentation loss: per-pixel cross-entropy with an ignore label, optional online hard example mining (OHEM)
and an auxiliary term for the head's deep-supervision branch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .segmentation import SegmentationOutput, upsample_logits

__all__ = ["SegmentationLoss", "ohem_cross_entropy"]


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    threshold: float = 0.7,
    min_kept: int = 100_000,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy averaged over the hard pixels only.

    A valid pixel is hard when the predicted probability of its true class is below ``threshold``; when fewer
    than ``min_kept`` pixels are hard, the ``min_kept`` pixels with the lowest true-class probability are used
    (all valid pixels when there are fewer). Returns 0 (with a gradient path) when no pixel is valid.

    Nothing here waits for the device (no data-dependent Python branch), so a training step with it can be
    captured as a CUDA graph.
    """
    if int(min_kept) < 1:
        raise ValueError(f"min_kept must be >= 1, got {min_kept}")
    ce = F.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    ).flatten()
    valid = (target != ignore_index).flatten()
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=1)
        safe = torch.where(target == ignore_index, torch.zeros_like(target), target)
        prob = logp.gather(1, safe.unsqueeze(1)).exp().flatten()
        prob = torch.where(valid, prob, torch.full_like(prob, 2.0))  # ignored pixels are never kept (sort last)
        hard = prob < threshold
        # The min_kept-th lowest probability. With fewer valid pixels it is an ignored pixel's 2.0 (or, when there
        # are fewer pixels at all, the largest), so "prob <= kth" keeps every valid pixel, as it should then.
        kth = torch.kthvalue(prob, min(int(min_kept), prob.numel())).values
        k = valid.sum().clamp(max=int(min_kept))  # the pixels to keep at least
        hard = torch.where(hard.sum() < k, prob <= kth, hard) & valid
    return torch.where(hard, ce, torch.zeros_like(ce)).sum() / hard.sum().clamp(min=1)


class SegmentationLoss:
    """``(SegmentationOutput, target [B, H, W] long) -> {"loss", "seg_loss", "aux_loss"}``.

    Logits are upsampled (bilinear) to the target's size before the loss, so it is computed at label
    resolution. ``ohem_threshold`` switches the main term to :func:`ohem_cross_entropy`.

    Args:
        ignore_index: target value excluded from the loss.
        aux_weight: weight of the auxiliary branch's cross-entropy (used when the head returns aux logits).
        ohem_threshold, ohem_min_kept: OHEM settings; ``None`` threshold = plain cross-entropy.
        class_weights: optional per-class weights.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        *,
        ignore_index: int = 255,
        aux_weight: float = 0.4,
        ohem_threshold: float | None = None,
        ohem_min_kept: int = 100_000,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if ohem_threshold is not None and not 0.0 < ohem_threshold <= 1.0:
            raise ValueError(f"ohem_threshold must be in (0, 1], got {ohem_threshold}")
        if ohem_threshold is not None and int(ohem_min_kept) < 1:
            raise ValueError(f"ohem_min_kept must be >= 1, got {ohem_min_kept}")
        self.ignore_index = int(ignore_index)
        self.aux_weight = float(aux_weight)
        self.ohem_threshold = ohem_threshold
        self.ohem_min_kept = int(ohem_min_kept)
        self.class_weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        self.label_smoothing = float(label_smoothing)

    def _ce(self, logits: torch.Tensor, target: torch.Tensor, *, ohem: bool) -> torch.Tensor:
        logits = upsample_logits(logits.float(), target.shape[-2:])
        weight = self.class_weights
        if weight is not None and weight.device != logits.device:  # moved once: a captured step copies nothing in
            weight = self.class_weights = weight.to(logits.device)
        if ohem and self.ohem_threshold is not None:
            return ohem_cross_entropy(
                logits,
                target,
                ignore_index=self.ignore_index,
                threshold=self.ohem_threshold,
                min_kept=self.ohem_min_kept,
                weight=weight,
                label_smoothing=self.label_smoothing,
            )
        # The mean over the valid pixels (weighted: over their class weights), as cross_entropy's "mean" computes
        # it, but 0 with a gradient path when no pixel is valid, and without asking the host which case it is.
        total = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index,
                                label_smoothing=self.label_smoothing, reduction="sum")
        valid = target != self.ignore_index
        if weight is None:
            count = valid.sum()
        else:
            safe = torch.where(valid, target, torch.zeros_like(target))
            count = torch.where(valid, weight[safe], torch.zeros_like(weight[safe])).sum()
        return total / count.to(total.dtype).clamp(min=torch.finfo(total.dtype).tiny)

    def __call__(self, output: SegmentationOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        target = target.long()
        seg = self._ce(output.logits, target, ohem=True)
        if output.aux_logits is not None and self.aux_weight > 0:
            aux = self._ce(output.aux_logits, target, ohem=False)
        else:
            aux = seg.new_zeros(())
        return {"loss": seg + self.aux_weight * aux, "seg_loss": seg.detach(), "aux_loss": aux.detach()}
