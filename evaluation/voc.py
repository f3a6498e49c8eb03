"""Pascal VOC detection metrics: per-class average precision at IoU 0.5 and its mean over classes, by both of
VOC's rules, next to COCO's 12 numbers.

The matching is the VOC devkit's (``VOCevaldet.m``): each class's detections, highest score first, are matched to
the ground-truth box of that class and image they overlap most; at IoU >= 0.5 a detection on a box not yet detected
is a true positive, on a box already detected a false positive (a duplicate), and on a difficult box (or a COCO
crowd region) neither; below 0.5 it is a false positive. Boxes are continuous pixel coordinates, in which the plain
IoU equals the devkit's IoU of 1-based inclusive pixel boxes (see :mod:`datasets.voc`). From the precision /
recall curve:

- VOC2007 (``VOC07_AP50``): the 11-point interpolated AP, the mean over recall r = 0, 0.1, ..., 1 of the highest
  precision at a recall >= r;
- VOC2010 and later (``VOC_AP50``): the area under the precision envelope (precision made monotone from the right),
  summed where the recall changes.

The mean is over the classes with at least one non-difficult ground-truth box among the evaluated images
(``-1.0``, as COCO's "undefined", when no class has one). Values are fractions in [0, 1], as COCO's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from .coco import PER_CLASS_COLUMNS, CocoEvaluator
from .coco_results import EvalPayload
from .per_class import format_per_class_table

__all__ = ["VOC_METRIC_NAMES", "VocEvaluator", "voc_ap", "voc_class_ap"]

#: The two VOC numbers :class:`VocEvaluator` adds: 11-point (VOC2007) and area (VOC2010+) mAP at IoU 0.5.
VOC_METRIC_NAMES: tuple[str, ...] = ("VOC07_AP50", "VOC_AP50")
IOU_THRESHOLD = 0.5


def voc_ap(recall: np.ndarray, precision: np.ndarray, *, eleven_point: bool) -> float:
    """AP of one class from its cumulative ``recall`` and ``precision`` (detections in score order): VOC2007's
    11-point interpolation (``eleven_point=True``) or the area under the monotone precision envelope (VOC2010+)."""
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if eleven_point:
        points = [precision[recall >= t / 10].max(initial=0.0) for t in range(11)]
        return float(np.mean(points))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # the envelope: the best precision at this recall or beyond
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy ``box`` with each of ``boxes`` [N, 4]."""
    iw = (np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])).clip(min=0)
    ih = (np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])).clip(min=0)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def voc_class_ap(
    ground_truth: dict[int, tuple[np.ndarray, np.ndarray]],
    image_ids: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    iou_threshold: float = IOU_THRESHOLD,
) -> tuple[float, float, int]:
    """``(11-point AP, area AP, number of non-difficult boxes)`` of one class.

    Args:
        ground_truth: image id -> (xyxy boxes [G, 4], ignored [G] bool: difficult or crowd) of this class, for
            every evaluated image that has any.
        image_ids, boxes, scores: the class's detections: image id [D], xyxy box [D, 4], score [D].
    APs are NaN when the class has no non-difficult box.
    """
    npos = int(sum(int((~ignored).sum()) for _, ignored in ground_truth.values()))
    if npos == 0:
        return float("nan"), float("nan"), 0
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    detected = {img: np.zeros(len(ign), dtype=bool) for img, (_, ign) in ground_truth.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, d in enumerate(order):
        img = int(image_ids[d])
        if img not in ground_truth:
            fp[rank] = 1
            continue
        gt_boxes, ignored = ground_truth[img]
        overlaps = _iou(np.asarray(boxes[d], np.float64), gt_boxes)
        j = int(np.argmax(overlaps))  # the first of equal best overlaps, as the devkit's max()
        if overlaps[j] < iou_threshold:
            fp[rank] = 1
        elif ignored[j]:
            continue  # on a difficult box: neither true nor false positive
        elif not detected[img][j]:
            tp[rank] = 1
            detected[img][j] = True
        else:
            fp[rank] = 1  # a second detection of a detected box
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, eleven_point=True), voc_ap(recall, precision, eleven_point=False), npos


def voc_per_class(coco_gt: COCO, payload: EvalPayload, *, iou_threshold: float = IOU_THRESHOLD) -> dict[int, tuple]:
    """Category id -> ``(11-point AP, area AP, non-difficult boxes)`` over the images of ``payload``."""
    evaluated = set(payload.image_ids.tolist())
    gt: dict[int, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for img in evaluated:
        for ann in coco_gt.imgToAnns.get(img, ()):
            x, y, w, h = ann["bbox"]
            ignored = bool(ann.get("difficult", 0) or ann.get("iscrowd", 0))
            gt[ann["category_id"]][img].append((x, y, x + w, y + h, ignored))
    det_images = payload.detection_image_ids()
    xyxy = payload.boxes.copy()
    xyxy[:, 2:] += xyxy[:, :2]
    out = {}
    for cat in sorted(coco_gt.getCatIds()):
        truth = {
            img: (np.asarray([r[:4] for r in rows], np.float64).reshape(-1, 4), np.asarray([r[4] for r in rows], bool))
            for img, rows in gt.get(cat, {}).items()
        }
        mine = payload.category_ids == cat
        out[cat] = voc_class_ap(truth, det_images[mine], xyxy[mine], payload.scores[mine], iou_threshold=iou_threshold)
    return out


class VocEvaluator(CocoEvaluator):
    """:class:`evaluation.coco.CocoEvaluator` that also reports Pascal VOC's mAP at IoU 0.5 by both rules
    (``VOC07_AP50``: 11-point, ``VOC_AP50``: area), ignoring difficult boxes (annotations with ``"difficult": 1``,
    and crowd regions) as VOC does. The per-class VOC APs are in :attr:`voc_per_class` after :meth:`compute`."""

    def reset(self) -> None:
        super().reset()
        #: Class name -> {"VOC07_AP50", "VOC_AP50", "num_gt"} of the last :meth:`compute` (NaN APs: no box).
        self.voc_per_class: dict[str, dict[str, Any]] = {}

    def compute(self) -> dict[str, Any]:
        """COCO's numbers (gathered across ranks by the parent) plus ``VOC07_AP50`` and ``VOC_AP50``; the summary
        gets two more lines."""
        metrics = super().compute()
        per_class = voc_per_class(self.coco_gt, self.payload())
        names = {c["id"]: str(c["name"]) for c in self.coco_gt.dataset["categories"]}
        self.voc_per_class = {
            names[cat]: {"VOC07_AP50": ap07, "VOC_AP50": ap, "num_gt": npos} for cat, (ap07, ap, npos) in per_class.items()
        }
        counted = [v for v in per_class.values() if v[2] > 0]
        voc07 = float(np.mean([v[0] for v in counted])) if counted else -1.0
        voc = float(np.mean([v[1] for v in counted])) if counted else -1.0
        # The VOC APs join the rows of the per-class table of COCO's numbers (None where a class has no box).
        for name, row in self.voc_per_class.items():
            if name in self.per_class:
                self.per_class[name].update({k: None if np.isnan(row[k]) else float(row[k]) for k in VOC_METRIC_NAMES})
        metrics.update({"VOC07_AP50": voc07, "VOC_AP50": voc})
        columns = (*PER_CLASS_COLUMNS[:2], *((k, f"{k} (%)", "percent") for k in VOC_METRIC_NAMES), PER_CLASS_COLUMNS[2])
        mean = {k: (None if metrics[k] == -1.0 else metrics[k]) for k in ("AP", "AP50", *VOC_METRIC_NAMES)}
        total = sum(v["num_gt"] for v in self.per_class.values())
        self.per_class_table = format_per_class_table(self.per_class, columns, [("mean", {**mean, "num_gt": total})])
        self.summary = "\n".join([
            self.summary,
            f" Pascal VOC mAP     (AP) @[ IoU=0.50      | VOC2007 11-point       ] = {voc07:0.3f}",
            f" Pascal VOC mAP     (AP) @[ IoU=0.50      | VOC2010+ area          ] = {voc:0.3f}",
        ])
        return metrics
