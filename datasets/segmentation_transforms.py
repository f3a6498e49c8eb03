"""Segmentation pipelines: train (scale, pad, random crop, flip, colour jitter) and eval (optional resize of the
image; the mask stays at the original resolution, where the metrics are computed).

Both map ``(image HxWx3 uint8 RGB, mask HxW uint8 train ids) -> dict(image, mask)``. The detection pipelines are
in :mod:`datasets.transforms`.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np

from ._seeding import ProcessRandom
from .segmentation import IGNORE_INDEX

__all__ = ["SegmentationTransform", "build_segmentation_eval_transform", "build_segmentation_train_transform"]


def _pair(value, name: str) -> tuple[int, int]:
    h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be a positive (height, width), got {tuple(value)}")
    return h, w


class SegmentationTransform:
    """Train or eval segmentation pipeline: ``(image HxWx3 uint8, mask HxW uint8) -> dict(image, mask)``.

    Train: resize to ``base_size`` (H, W) when given, then by a factor drawn uniformly from ``scale_range``
    (image bilinear, mask nearest, one resize each), pad bottom/right to at least ``crop_size`` (image 0, mask
    255), take a random ``crop_size`` (H, W) crop, flip horizontally with probability ``hflip_prob`` and jitter
    brightness, contrast and saturation of the image by up to ``color_jitter`` (0 disables it). Resize, pad and
    crop are one step (:func:`_scaled_crop`), computed on the crop's window when the resized image is more than
    twice the window's size: then the cost follows the crop size, not the resized image's.

    Eval: resize the image to ``eval_size`` (H, W) when given (bilinear); the mask is returned unchanged, at the
    original resolution.

    Randomness: see :class:`datasets._seeding.ProcessRandom` (one generator per process, re-seeded in each
    loader worker; ``seed`` fixes it in the main process).
    """

    def __init__(
        self,
        *,
        train: bool,
        crop_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: tuple[int, int] | None = None,
        hflip_prob: float = 0.5,
        color_jitter: float = 0.2,
        eval_size: tuple[int, int] | None = None,
        seed: int | None = None,
    ) -> None:
        self.train = bool(train)
        self.eval_size = None if eval_size is None else _pair(eval_size, "eval_size")
        self.base_size = None if base_size is None else _pair(base_size, "base_size")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        self.scale_range = (lo, hi)
        self.hflip_prob = float(hflip_prob)
        self.color_jitter = float(color_jitter)
        self.crop_size: tuple[int, int] | None = None
        self.pipeline: A.Compose | None = None
        self._random: ProcessRandom | None = None
        if not self.train:
            return
        if crop_size is None:
            raise ValueError("a train transform needs crop_size")
        self.crop_size = _pair(crop_size, "crop_size")
        # Scale, pad and crop are one step (:meth:`_scaled_crop`, computed on the crop only); then these:
        steps = [A.HorizontalFlip(p=self.hflip_prob)]
        if self.color_jitter > 0:
            j = self.color_jitter
            steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=1.0))
        self.pipeline = A.Compose(steps)
        self._random = ProcessRandom(seed, pipeline=self.pipeline)

    def __repr__(self) -> str:
        if self.train:
            return (
                f"{type(self).__name__}(train=True, crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"base_size={self.base_size}, hflip_prob={self.hflip_prob}, color_jitter={self.color_jitter})"
            )
        return f"{type(self).__name__}(train=False, eval_size={self.eval_size})"

    def __call__(self, image: np.ndarray, mask: np.ndarray, *, sample_key: int | None = None) -> dict:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an HxWx3 uint8 image, got shape {image.shape} and dtype {image.dtype}"
            )
        if mask.shape != image.shape[:2] or mask.dtype != np.uint8:
            raise ValueError(
                f"expected an HxW uint8 mask the size of the image {image.shape[:2]}, got {mask.shape} {mask.dtype}"
            )
        h, w = image.shape[:2]
        if not self.train:
            if self.eval_size is not None and self.eval_size != (h, w):
                image = cv2.resize(image, self.eval_size[::-1], interpolation=cv2.INTER_LINEAR)
            return {"image": image, "mask": mask}

        if sample_key is not None:  # augmentation fixed by the sample key (resumable, worker-independent)
            self._random.seed_sample(sample_key)
        else:
            self._random.refresh()
        bh, bw = self.base_size if self.base_size is not None else (h, w)
        rng = self._random.rng
        factor = float(rng.uniform(*self.scale_range))
        nh, nw = max(1, round(bh * factor)), max(1, round(bw * factor))
        ch, cw = self.crop_size
        # The crop's place in the scaled image (top-left when the scaled image is smaller than the crop).
        y0, x0 = int(rng.integers(0, max(nh - ch, 0) + 1)), int(rng.integers(0, max(nw - cw, 0) + 1))
        image, mask = _scaled_crop(image, mask, (nh, nw), (y0, x0), self.crop_size)
        out = self.pipeline(image=image, mask=mask)
        return {"image": np.ascontiguousarray(out["image"]), "mask": np.ascontiguousarray(out["mask"])}


def _scaled_crop(image: np.ndarray, mask: np.ndarray, size: tuple[int, int], corner: tuple[int, int],
                 crop: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``crop`` (H, W) window at ``corner`` (y, x) of the image and mask resized to ``size`` (H, W), padded at
    the bottom and right (image 0, mask 255) where the resized image ends: what resizing the whole image (bilinear;
    the mask nearest) and cropping it would give. When the resized image is more than twice the window's size, it
    is computed from the source pixels under the window only, so the cost follows the crop; otherwise the whole
    image is resized and cropped.

    The mask is exactly that of ``cv2.resize(..., INTER_NEAREST)`` and cropping; the image samples the same
    source positions as ``cv2.resize(..., INTER_LINEAR)`` (pixel centres aligned, edges clamped), with OpenCV's
    warping interpolation weights (1/32 pixel) instead of its resizing ones, so values may differ by a level or two.
    """
    h, w = mask.shape
    (nh, nw), (y0, x0), (ch, cw) = size, corner, crop
    wh, ww = min(ch, nh - y0), min(cw, nw - x0)  # the window's part inside the resized image
    if (nh, nw) == (h, w):
        img, msk = image[y0:y0 + wh, x0:x0 + ww], mask[y0:y0 + wh, x0:x0 + ww]
    elif nh * nw <= 2 * wh * ww:  # the window is most of the resized image: resizing it all is as cheap
        img = cv2.resize(np.asarray(image), (nw, nh), interpolation=cv2.INTER_LINEAR)[y0:y0 + wh, x0:x0 + ww]
        msk = cv2.resize(np.asarray(mask), (nw, nh), interpolation=cv2.INTER_NEAREST)[y0:y0 + wh, x0:x0 + ww]
    else:
        # Nearest: OpenCV's resize takes source index floor(i * src / dst) (scale as a double, as it computes it).
        ry, rx = 1.0 / (nh / h), 1.0 / (nw / w)
        rows = np.minimum(np.floor(np.arange(y0, y0 + wh) * ry).astype(np.intp), h - 1)
        cols = np.minimum(np.floor(np.arange(x0, x0 + ww) * rx).astype(np.intp), w - 1)
        msk = mask.take(rows, axis=0).take(cols, axis=1)
        # Bilinear with aligned pixel centres: output (i, j) samples source ((i + 0.5) * h / nh - 0.5, ...).
        sy, sx = h / nh, w / nw
        top, left = (y0 + 0.5) * sy - 0.5, (x0 + 0.5) * sx - 0.5
        r0, c0 = max(0, int(np.floor(top))), max(0, int(np.floor(left)))
        r1 = min(h, int(np.floor(top + (wh - 1) * sy)) + 2)
        c1 = min(w, int(np.floor(left + (ww - 1) * sx)) + 2)
        matrix = np.array([[sx, 0.0, left - c0], [0.0, sy, top - r0]])
        img = cv2.warpAffine(image[r0:r1, c0:c1], matrix, (ww, wh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)
    if (wh, ww) == (ch, cw):
        return np.ascontiguousarray(img), np.ascontiguousarray(msk)
    out_img = np.zeros((ch, cw, 3), np.uint8)
    out_msk = np.full((ch, cw), IGNORE_INDEX, np.uint8)
    out_img[:wh, :ww], out_msk[:wh, :ww] = img, msk
    return out_img, out_msk


def build_segmentation_train_transform(
    *,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: tuple[int, int] | None = None,
    hflip_prob: float = 0.5,
    color_jitter: float = 0.2,
    seed: int | None = None,
) -> SegmentationTransform:
    """Resize to ``base_size`` (optional), random scale, pad (mask 255), random ``crop_size`` crop, flip, jitter."""
    return SegmentationTransform(
        train=True,
        crop_size=crop_size,
        scale_range=scale_range,
        base_size=base_size,
        hflip_prob=hflip_prob,
        color_jitter=color_jitter,
        seed=seed,
    )


def build_segmentation_eval_transform(*, eval_size: tuple[int, int] | None = None) -> SegmentationTransform:
    """Resize the image (only) to ``eval_size`` (H, W) when given; the mask stays at the original resolution."""
    return SegmentationTransform(train=False, eval_size=eval_size)
