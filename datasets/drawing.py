"""Pictures a person can look at: boxes drawn with their class names (and scores), segmentations as colour
overlays. Shared by prediction, the dataset viewer and the training logger's validation images."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from .segmentation import default_palette

__all__ = ["colorize", "draw_detections", "overlay_segmentation", "palette_for"]


def colorize(train_ids: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Class map (255 = ignore) -> RGB image; ignored pixels are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[train_ids]


def palette_for(class_names: Sequence[str]) -> list[tuple[int, int, int]]:
    """The official colours for the Cityscapes classes, a fixed distinct palette otherwise (RGB)."""
    if tuple(class_names) == tuple(CITYSCAPES_CLASSES):
        return [tuple(c) for c in CITYSCAPES_PALETTE]
    return [tuple(c) for c in default_palette(len(class_names))]


def draw_detections(
    image: np.ndarray,
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float] | None,
    labels: Sequence[int],
    class_names: Sequence[str],
) -> np.ndarray:
    """A copy of ``image`` (HxWx3 uint8 RGB) with each box outlined in its class colour and tagged
    ``"<name> <score>"`` (``"<name>"`` when ``scores`` is None, e.g. ground truth)."""
    out = np.ascontiguousarray(image.copy())
    palette = palette_for(class_names)
    h, w = out.shape[:2]
    thickness = max(1, round(min(h, w) / 300))
    font_scale = max(0.35, min(h, w) / 1000)
    if scores is None:
        scores = [None] * len(labels)
    for box, score, label in zip(boxes, scores, labels):
        colour = tuple(int(c) for c in palette[int(label) % len(palette)])
        x1, y1, x2, y2 = (int(round(v)) for v in box)  # noqa: RUF046 -- v may be a 0-d tensor
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        name = class_names[int(label)]
        text = name if score is None else f"{name} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else y1 + th + base + 2
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw + 2, ty + 1), colour, -1)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        cv2.putText(out, text, (x1 + 1, ty - base + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, ink, 1, cv2.LINE_AA)
    return out


def overlay_segmentation(
    image: np.ndarray, mask: np.ndarray, class_names: Sequence[str], *, alpha: float = 0.5
) -> np.ndarray:
    """``image`` (HxWx3 uint8 RGB) blended with the class colours of ``mask`` (HxW class map, 255 = none)."""
    colours = colorize(mask, palette_for(class_names))
    blended = cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)
    return np.where((mask == 255)[..., None], image, blended)
