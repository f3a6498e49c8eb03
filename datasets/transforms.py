"""Detection pipelines: train (scale jitter, pad, random crop, flip) and eval (letterbox: resize + pad).

Both map ``(image hxwx3 uint8 RGB, boxes [N, 4] float32 xyxy in image pixels, labels [N] int64)`` to
``dict(image=HxWx3 uint8, boxes=float32 [M, 4] xyxy in output pixels, labels=int64 [M], scale=float)``, where
``(H, W)`` is ``image_size`` (one side for a square, or ``[H, W]``). Images stay uint8; normalisation happens
later, on the device.

The resize (by ``min(H / h, W / w)``, so the image fits ``H x W`` keeping its aspect ratio, times the train-time
jitter) is a single OpenCV call; albumentations does the padding, cropping and flipping and keeps the boxes in
step. Boxes are clipped to the output and boxes narrower or shorter than 1 output pixel are dropped together
with their labels.
"""

from __future__ import annotations

import numbers
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np

from utils.sizes import image_hw

from ._seeding import ProcessRandom

__all__ = ["DetectionTransform", "build_eval_transform", "build_train_transform"]

_MIN_SIZE = 1.0  # output boxes narrower or shorter than this (pixels) are dropped


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return image
    # Area averaging avoids aliasing when shrinking a lot; bilinear is cheaper and good enough for mild resizes.
    interp = cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR
    return cv2.resize(image, (nw, nh), interpolation=interp)


def _clip_and_filter(boxes: np.ndarray, labels: np.ndarray, w: float, h: float):
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= _MIN_SIZE) & ((boxes[:, 3] - boxes[:, 1]) >= _MIN_SIZE)
    return boxes[keep], labels[keep]


class DetectionTransform:
    """Train or eval detection pipeline (see the module docstring for the call contract).

    ``image_size`` is one side (a square output) or ``(H, W)``.

    Eval: resize by ``min(H / h, W / w)`` (the largest size that fits, aspect ratio kept) and pad bottom/right
    with zeros to ``H x W``. ``scale`` is output pixels per original pixel, so ``original = output / scale``.

    Train: resize by ``min(H / h, W / w)`` times a factor drawn uniformly from ``scale_range``, pad
    bottom/right with zeros to at least ``H x W``, take a random ``H x W`` crop, flip
    horizontally with probability ``hflip_prob``. ``scale`` is then the resize factor including the jitter
    (output = original * scale, before the crop offset and the flip).

    Randomness: one generator per process. In a data-loader worker it is re-seeded from the worker's seed
    (which the loader derives from the main process' torch seed), so workers draw different augmentations and
    runs with a fixed global seed repeat. In the main process it is seeded from ``seed``, or, when ``seed`` is
    None, from Python's global ``random`` module (seeded by ``lightning.seed_everything``).
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        train: bool,
        scale_range: tuple[float, float] = (0.1, 2.0),
        hflip_prob: float = 0.5,
        seed: int | None = None,
    ) -> None:
        height, width = image_hw(image_size)
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        #: As given: one side (a square) or ``(H, W)``; :attr:`out_hw` is always ``(H, W)``.
        self.image_size = height if isinstance(image_size, numbers.Integral) else (height, width)
        self.out_hw = (height, width)
        self.train = bool(train)
        self.scale_range = (lo, hi)
        self.hflip_prob = float(hflip_prob)
        self.seed = seed
        self.pipeline: A.Compose | None = None
        if self.train:
            self.pipeline = A.Compose(
                [
                    A.PadIfNeeded(
                        min_height=height, min_width=width, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                        fill=0,
                    ),
                    A.RandomCrop(height=height, width=width, p=1.0),
                    A.HorizontalFlip(p=self.hflip_prob),
                ],
                # Labels travel as box indices (exact integers), then index the int64 labels.
                bbox_params=A.BboxParams(
                    format="pascal_voc", label_fields=["index"], min_width=_MIN_SIZE, min_height=_MIN_SIZE, clip=True
                ),
            )
        self._random = ProcessRandom(seed, pipeline=self.pipeline) if self.train else None

    def __repr__(self) -> str:
        if self.train:
            return (
                f"{type(self).__name__}(image_size={self.image_size}, train=True, "
                f"scale_range={self.scale_range}, hflip_prob={self.hflip_prob})"
            )
        return f"{type(self).__name__}(image_size={self.image_size}, train=False)"

    def _reseed(self) -> None:
        """Seed the generators for this process (see the class docstring); no-op when already done."""
        if self._random is not None:
            self._random.refresh()

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, *, sample_key: int | None = None
    ) -> dict:
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWxC uint8 image, got shape {image.shape} and dtype {image.dtype}")
        boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)  # a copy: clipped in place below
        labels = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"got {len(boxes)} boxes but {len(labels)} labels")
        h, w = image.shape[:2]
        out_h, out_w = self.out_hw
        base = min(out_h / h, out_w / w)  # for a square output, out / max(h, w)
        if not self.train:
            resized = _resize(image, base)
            nh, nw = resized.shape[:2]
            out = np.zeros((out_h, out_w, image.shape[2]), dtype=np.uint8)
            out[:nh, :nw] = resized
            boxes, labels = _clip_and_filter(boxes * np.float32(base), labels, nw, nh)
            return {"image": out, "boxes": boxes, "labels": labels, "scale": float(base)}

        if sample_key is not None:  # augmentation fixed by the sample key (resumable, worker-independent)
            self._random.seed_sample(sample_key)
        else:
            self._reseed()
        scale = base * float(self._random.rng.uniform(*self.scale_range))
        resized = _resize(image, scale)
        nh, nw = resized.shape[:2]
        # Boxes follow the actual per-axis resize factors (the rounding of the new size included).
        boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
        boxes, labels = _clip_and_filter(boxes, labels, nw, nh)
        out = self.pipeline(image=resized, bboxes=boxes, index=np.arange(len(labels)))
        index = np.asarray(out["index"]).astype(np.int64).reshape(-1)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        return {
            "image": np.ascontiguousarray(out["image"]),
            "boxes": out_boxes,
            "labels": labels[index],
            "scale": float(scale),
        }


def build_train_transform(
    *, image_size: int | tuple[int, int], scale_range: tuple[float, float] = (0.1, 2.0), hflip_prob: float = 0.5,
    seed: int | None = None,
) -> DetectionTransform:
    """Fit into ``image_size`` (a side or ``(H, W)``), scale jitter in ``scale_range``, pad, random crop, flip."""
    return DetectionTransform(
        image_size=image_size, train=True, scale_range=scale_range, hflip_prob=hflip_prob, seed=seed
    )


def build_eval_transform(*, image_size: int | tuple[int, int]) -> DetectionTransform:
    """Letterbox: resize to fit ``image_size`` (a side or ``(H, W)``) keeping the aspect ratio, pad bottom/right."""
    return DetectionTransform(image_size=image_size, train=False)
