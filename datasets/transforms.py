"""Albumentations pipelines for detection: train (scale jitter, crop, flip) and eval (resize + pad).

Both return a square ``image_size`` uint8 image; normalisation happens later, on the device.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["build_train_transform", "build_eval_transform", "DetectionTransform"]


class DetectionTransform:
    """``(image HxWx3 uint8, boxes [N, 4] xyxy, labels [N]) -> dict(image, boxes, labels, scale)``.

    ``scale`` is output pixels per original pixel of the deterministic resize step (the eval mapping:
    ``original = output / scale``).
    """

    def __init__(self, *, image_size: int, train: bool, scale_range=(0.1, 2.0), hflip_prob: float = 0.5) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.image_size = image_size
        self.train = train
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels"], min_width=1.0, min_height=1.0, clip=True)
        pad = A.PadIfNeeded(
            min_height=image_size, min_width=image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0
        )
        if train:
            ops = [
                A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR, p=1.0),
                pad,
                A.RandomCrop(height=image_size, width=image_size, p=1.0),
                A.HorizontalFlip(p=hflip_prob),
            ]
        else:
            ops = [pad]
        self.pipeline = A.Compose(ops, bbox_params=bbox_params)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> dict:
        h, w = image.shape[:2]
        scale = self.image_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.float32(scale)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, nw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, nh)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        out = self.pipeline(image=image, bboxes=boxes, labels=labels)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"]).astype(np.int64).reshape(-1)
        return {"image": out["image"], "boxes": out_boxes, "labels": out_labels, "scale": float(scale)}


def build_train_transform(*, image_size: int, scale_range=(0.1, 2.0), hflip_prob: float = 0.5) -> DetectionTransform:
    """Resize longest side to ``image_size``, scale jitter in ``scale_range``, pad, random square crop, flip."""
    return DetectionTransform(image_size=image_size, train=True, scale_range=scale_range, hflip_prob=hflip_prob)


def build_eval_transform(*, image_size: int) -> DetectionTransform:
    """Resize longest side to ``image_size`` and pad bottom/right to a square."""
    return DetectionTransform(image_size=image_size, train=False)
