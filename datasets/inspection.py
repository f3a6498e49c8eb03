"""Looking at a dataset before training on it: its ground truth in original pixels (read without decoding images where
the dataset allows), per-class counts, the box size distribution, and contact sheets of samples."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from .drawing import draw_detections, overlay_segmentation

__all__ = [
    "COCO_AREA_LIMITS",
    "box_statistics",
    "contact_sheet",
    "detection_targets",
    "draw_tile",
    "pixel_counts",
    "pixel_statistics",
]

#: COCO's object size buckets by area: small below 32², medium below 96², large from 96² up.
COCO_AREA_LIMITS = (32**2, 96**2)
_QUANTILES = (("min", 0.0), ("p05", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95), ("max", 1.0))


def detection_targets(ds, indices: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, tuple]]:
    """``(boxes [N, 4] xyxy float64 in original pixels, labels [N] int64, (h, w))`` per image of a detection dataset.

    A dataset with ``targets(i)`` and ``original_size(i)`` (:class:`datasets.CocoDetection` and the formats built on
    it) is read without decoding an image: its training targets (crowd regions and boxes below ``min_box_size`` left
    out). Any other is read sample by sample; give it the evaluation transform, whose ``scale`` maps its boxes back
    to original pixels (an augmented sample's crop does not map back)."""
    indices = range(len(ds)) if indices is None else indices
    fast = callable(getattr(ds, "targets", None)) and callable(getattr(ds, "original_size", None))
    for i in indices:
        if fast:
            boxes, labels = ds.targets(i)
            size = tuple(int(v) for v in ds.original_size(i))
        else:
            sample = ds[i]
            boxes = np.asarray(sample["boxes"], dtype=np.float64).reshape(-1, 4) / float(sample["scale"])
            labels = sample["labels"]
            size = tuple(int(v) for v in sample["orig_size"])
        yield np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64).reshape(-1), size


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    return {name: round(float(np.quantile(values, q)), 3) for name, q in _QUANTILES}


def size_buckets(areas: np.ndarray) -> np.ndarray:
    """COCO size bucket of each area: 0 small, 1 medium, 2 large (:data:`COCO_AREA_LIMITS`)."""
    return np.searchsorted(np.asarray(COCO_AREA_LIMITS, dtype=np.float64), areas, side="right")


def box_statistics(boxes: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class object counts, COCO size buckets (box area ``w * h`` in the pixels of ``boxes``) and width, height
    and aspect (w / h) quantiles of xyxy ``boxes [N, 4]`` with ``labels [N]``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    counts = np.bincount(labels, minlength=len(class_names)) if labels.size else np.zeros(len(class_names), int)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    buckets = np.bincount(size_buckets(w * h), minlength=3)
    return {
        "objects": int(labels.size),
        "per_class": {str(name): int(n) for name, n in zip(class_names, counts)},
        "size_buckets": {"small": int(buckets[0]), "medium": int(buckets[1]), "large": int(buckets[2])},
        "width": _quantiles(w),
        "height": _quantiles(h),
        "aspect_w_over_h": _quantiles(w / np.where(h > 0, h, np.nan)) if labels.size else None,
    }


def pixel_counts(ds, indices: Sequence[int] | None = None, num_classes: int | None = None) -> np.ndarray:
    """Pixels per train id ``[256]`` (255 = ignored) over the masks of a segmentation dataset at their stored size,
    read without decoding the images where the dataset allows (``read_mask`` and ``train_ids``, as
    :class:`datasets.SegmentationDataset`); any other dataset is read sample by sample (masks as its transform gives
    them)."""
    indices = range(len(ds)) if indices is None else indices
    fast = callable(getattr(ds, "read_mask", None)) and callable(getattr(ds, "train_ids", None))
    total = np.zeros(256, dtype=np.int64)
    for i in indices:
        mask = ds.train_ids(ds.read_mask(i)) if fast else np.asarray(ds[i]["mask"], dtype=np.uint8)
        total += np.bincount(np.asarray(mask, dtype=np.uint8).reshape(-1), minlength=256)
    return total


def pixel_statistics(counts: np.ndarray, class_names: Sequence[str], ignore_index: int = 255) -> dict[str, Any]:
    """Per-class pixel counts and shares of the labelled pixels, from :func:`pixel_counts`."""
    counts = np.asarray(counts, dtype=np.int64)
    n = len(class_names)
    labelled = int(counts[:n].sum())
    return {
        "pixels": int(counts.sum()),
        "ignored_pixels": int(counts[ignore_index]),
        "per_class": {str(name): int(counts[k]) for k, name in enumerate(class_names)},
        "per_class_share": {str(name): round(int(counts[k]) / labelled, 6) if labelled else 0.0
                            for k, name in enumerate(class_names)},
    }


def draw_tile(image: np.ndarray, class_names: Sequence[str], *, tile_size: int, boxes: np.ndarray | None = None,
              labels: np.ndarray | None = None, mask: np.ndarray | None = None, caption: str = "") -> np.ndarray:
    """``image`` (HxWx3 uint8 RGB) scaled so its longer side is ``tile_size``, with its boxes (class names, no scores)
    or its mask overlay drawn at that size (so labels stay readable) and ``caption`` in the top-left corner."""
    h, w = image.shape[:2]
    scale = tile_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if mask is not None:
        mask = cv2.resize(np.ascontiguousarray(mask, dtype=np.uint8), size, interpolation=cv2.INTER_NEAREST)
        out = overlay_segmentation(out, mask, class_names)
    if boxes is not None and len(boxes):
        out = draw_detections(out, np.asarray(boxes, dtype=np.float64) * scale, None, labels, class_names)
    if caption:
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        cv2.rectangle(out, (0, size[1] - th - base - 4), (tw + 6, size[1]), (0, 0, 0), -1)
        cv2.putText(out, caption, (3, size[1] - base - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return out


def contact_sheet(tiles: Sequence[np.ndarray], *, columns: int, gap: int = 4) -> np.ndarray:
    """The tiles (HxWx3 uint8) on a grey grid of ``columns`` columns, row by row, each cell the size of the largest
    tile."""
    if not tiles:
        raise ValueError("contact_sheet needs at least one tile")
    columns = max(1, min(int(columns), len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    ch = max(t.shape[0] for t in tiles) + gap
    cw = max(t.shape[1] for t in tiles) + gap
    sheet = np.full((rows * ch + gap, columns * cw + gap, 3), 64, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        y, x = gap + r * ch, gap + c * cw
        sheet[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return sheet
