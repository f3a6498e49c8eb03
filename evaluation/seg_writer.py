"""Writes segmentation predictions: one PNG per image in the dataset's label ids (for Cityscapes the official
submission format, named ``{city}_{seq}_{frame}_leftImg8bit.png``) and, optionally, colour overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from datasets.drawing import colorize
from utils.files import atomic_path

__all__ = ["SegmentationWriter", "write_image_atomic"]


def write_image_atomic(path: Path, image: np.ndarray, params: Sequence[int] = ()) -> None:
    """Write ``image`` (uint8; HxW or HxWx3 BGR; format from the suffix) to ``path`` via a temporary file, so
    a crash never leaves a truncated file under the final name."""
    ok, encoded = cv2.imencode(Path(path).suffix, image, list(params))
    if not ok:
        raise OSError(f"could not encode {path}")
    # Not fsynced: prediction pictures are many and can be written again; the rename still keeps them whole.
    with atomic_path(path, durable=False) as tmp:
        tmp.write_bytes(encoded.tobytes())


class SegmentationWriter:
    """Writes the predictions of images of ``dataset`` (a :class:`datasets.CityscapesSegmentation` or
    :class:`datasets.SegmentationFolder`) under ``out_dir``.

    ``out_dir/predictions/<name>``: the class map converted back to the dataset's label ids
    (``dataset.label_ids_for_output``), named by ``dataset.prediction_file_name``. With ``overlays``,
    ``out_dir/overlays/<name>.jpg``: the image blended with the class colours (``alpha`` = colour weight).
    """

    def __init__(self, dataset, out_dir: str | Path, *, overlays: bool = False, alpha: float = 0.5) -> None:
        self.dataset = dataset
        self.prediction_dir = Path(out_dir) / "predictions"
        self.overlay_dir = Path(out_dir) / "overlays" if overlays else None
        self.alpha = float(alpha)
        self.prediction_dir.mkdir(parents=True, exist_ok=True)
        if self.overlay_dir is not None:
            self.overlay_dir.mkdir(parents=True, exist_ok=True)

    def write(self, indices: Sequence[int], preds: Sequence[np.ndarray]) -> None:
        for index, pred in zip(indices, preds):
            name = self.dataset.prediction_file_name(index)
            write_image_atomic(self.prediction_dir / name, self.dataset.label_ids_for_output(pred))
            if self.overlay_dir is not None:
                self._overlay(index, pred, Path(name).stem)

    def _overlay(self, index: int, pred: np.ndarray, stem: str) -> None:
        # BGR, as stored (EXIF orientation not applied: the dataset reads it so)
        image = cv2.imread(str(self.dataset.image_path(index)), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        colours = colorize(pred, self.dataset.palette)[:, :, ::-1]
        if image is None or image.shape[:2] != pred.shape:
            blended = np.ascontiguousarray(colours)
        else:
            blended = cv2.addWeighted(image, 1.0 - self.alpha, np.ascontiguousarray(colours), self.alpha, 0.0)
        write_image_atomic(self.overlay_dir / f"{stem}.jpg", blended, (cv2.IMWRITE_JPEG_QUALITY, 90))
