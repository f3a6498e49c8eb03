"""Semantic segmentation metrics from a confusion matrix accumulated on the device.

IoU per class is ``TP / (TP + FP + FN)`` over the whole split (not averaged per image); a class with no
ground-truth pixel and no prediction has no IoU (NaN, reported as ``null``) and is left out of the mean,
which is how the official Cityscapes evaluation averages. Per class the results are also given in the layout the
detection evaluation uses (``per_class: {name: {"IoU", "Acc", "num_gt_pixels"}}``, :mod:`evaluation.per_class`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from utils.distributed import is_distributed

from .per_class import format_per_class_table

__all__ = ["PER_CLASS_COLUMNS", "ConfusionMatrix", "format_iou_table", "iou_from_confusion"]

#: The per-class values (``per_class`` of :meth:`ConfusionMatrix.compute`) as columns of the printed table.
PER_CLASS_COLUMNS = (("IoU", "IoU (%)", "percent"), ("Acc", "Acc (%)", "percent"),
                     ("num_gt_pixels", "GT pixels", "count"))


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU (float64, NaN where the class never occurs) from ``confusion[gt, pred]``."""
    conf = confusion.double()
    tp = conf.diag()
    denom = conf.sum(0) + conf.sum(1) - tp
    return torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))


class ConfusionMatrix:
    """Accumulates ``confusion[gt, pred]`` (int64, on the predictions' device) with one ``bincount`` per update.

    Pixels whose target equals ``ignore_index`` are skipped. :meth:`compute` sums the matrices of all
    processes (``torch.distributed`` when initialised) before computing the metrics, so every rank returns
    the numbers of the whole split.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.matrix: torch.Tensor | None = None

    def reset(self) -> None:
        self.matrix = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` and ``target``: integer label maps of the same shape (any batch layout)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        n = self.num_classes
        target = target.to(pred.device).long().flatten()
        pred = pred.long().flatten()
        valid = target != self.ignore_index
        if bool(((target < 0) | (target >= n))[valid].any()):
            bad = sorted(set(target[valid & ((target < 0) | (target >= n))].unique().tolist()))
            raise ValueError(f"target holds labels {bad[:10]} outside 0..{n - 1} (ignore index {self.ignore_index})")
        counts = torch.bincount(target[valid] * n + pred[valid].clamp(0, n - 1), minlength=n * n)
        counts = counts.view(n, n)
        self.matrix = counts if self.matrix is None else self.matrix + counts.to(self.matrix.device)

    def reduced(self) -> torch.Tensor:
        """The matrix summed over all processes (CPU int64)."""
        matrix = self.matrix
        if matrix is None:
            matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        if is_distributed():
            device = matrix.device
            if dist.get_backend() == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            matrix = matrix.to(device).clone()
            dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
        return matrix.cpu()

    def compute(self) -> dict:
        """``{"mIoU": float, "IoU": {class name: float | None}, "aAcc": float, "mAcc": float, "per_class": {class
        name: {"IoU": float | None, "Acc": float | None, "num_gt_pixels": int}}}`` over all ranks. ``IoU`` holds the
        same values as ``per_class`` (kept for readers of earlier metrics files); ``Acc`` is the share of the class's
        ground-truth pixels predicted as it (``None`` without any)."""
        conf = self.reduced()
        iou = iou_from_confusion(conf)
        valid = ~torch.isnan(iou)
        total = conf.sum().item()
        gt = conf.sum(1).double()
        acc = torch.where(gt > 0, conf.diag().double() / gt.clamp(min=1), torch.full_like(gt, float("nan")))
        acc_valid = ~torch.isnan(acc)

        def value(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        per_class = {
            name: {"IoU": value(i), "Acc": value(a), "num_gt_pixels": int(n)}
            for name, i, a, n in zip(self.class_names, iou.tolist(), acc.tolist(), conf.sum(1).tolist())
        }
        return {
            "mIoU": float(iou[valid].mean()) if bool(valid.any()) else float("nan"),
            "IoU": {name: (None if math.isnan(v) else float(v)) for name, v in zip(self.class_names, iou.tolist())},
            "aAcc": float(conf.diag().sum().item() / total) if total else float("nan"),
            "mAcc": float(acc[acc_valid].mean()) if bool(acc_valid.any()) else float("nan"),
            "per_class": per_class,
        }


def format_iou_table(metrics: dict) -> str:
    """The per-class table (IoU, accuracy and ground-truth pixels, percentages) with the means (mIoU, mAcc) and the
    pixel accuracy (aAcc) below: the layout of the detection evaluation's per-class table."""
    per_class = metrics.get("per_class") or {name: {"IoU": v} for name, v in metrics["IoU"].items()}
    total = sum(int(v.get("num_gt_pixels") or 0) for v in per_class.values())
    footer = [("mean (mIoU, mAcc)", {"IoU": metrics["mIoU"], "Acc": metrics.get("mAcc"), "num_gt_pixels": total}),
              ("all pixels (aAcc)", {"Acc": metrics.get("aAcc")})]
    return format_per_class_table(per_class, PER_CLASS_COLUMNS, footer)
