"""Semantic segmentation metrics from a confusion matrix accumulated on the device.

IoU per class is ``TP / (TP + FP + FN)`` over the whole split (not averaged per image); a class with no
ground-truth pixel and no prediction has no IoU (NaN, reported as ``null``) and is left out of the mean,
which is how the official Cityscapes evaluation averages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from utils.distributed import is_distributed

__all__ = ["ConfusionMatrix", "format_iou_table", "iou_from_confusion"]


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
        """``{"mIoU": float, "IoU": {class name: float | None}, "aAcc": float, "mAcc": float}`` over all ranks."""
        conf = self.reduced()
        iou = iou_from_confusion(conf)
        valid = ~torch.isnan(iou)
        total = conf.sum().item()
        gt = conf.sum(1).double()
        acc = torch.where(gt > 0, conf.diag().double() / gt.clamp(min=1), torch.full_like(gt, float("nan")))
        acc_valid = ~torch.isnan(acc)
        return {
            "mIoU": float(iou[valid].mean()) if bool(valid.any()) else float("nan"),
            "IoU": {name: (None if math.isnan(v) else float(v)) for name, v in zip(self.class_names, iou.tolist())},
            "aAcc": float(conf.diag().sum().item() / total) if total else float("nan"),
            "mAcc": float(acc[acc_valid].mean()) if bool(acc_valid.any()) else float("nan"),
        }


def format_iou_table(metrics: dict) -> str:
    """A readable per-class IoU table followed by mIoU (percentages)."""
    names = list(metrics["IoU"])
    width = max([len("class")] + [len(n) for n in names])
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 10)]
    for name in names:
        v = metrics["IoU"][name]
        lines.append(f"{name:<{width}}  {'   n/a' if v is None else f'{100 * v:6.2f}'}")
    lines.append("-" * (width + 10))
    lines.append(f"{'mIoU':<{width}}  {100 * metrics['mIoU']:6.2f}")
    lines.append(f"{'aAcc':<{width}}  {100 * metrics['aAcc']:6.2f}")
    return "\n".join(lines)
