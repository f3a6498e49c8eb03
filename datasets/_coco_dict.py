"""What the readers of other detection formats (Pascal VOC, YOLO txt) share: counting or raising on bad entries,
image sizes from file headers, and the COCO-format dict they build for :class:`datasets.CocoDetection`."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ._skip import skip_summary
from .errors import DatasetError, DatasetNotFoundError

__all__ = ["IMAGE_SUFFIXES", "BadEntry", "Problems", "check_class_names", "coco_dict", "header_size"]

log = logging.getLogger(__name__)

#: Image files the readers look for (case-insensitive): what OpenCV decodes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class BadEntry(DatasetError):
    """A bad file or entry, with the short ``reason`` that ``skip_bad`` counts it under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Problems:
    """Bad entries met while reading a dataset: the first raises :class:`DatasetError` with its message, or with
    ``skip_bad`` each is counted by reason (objects and images apart) for one warning at the end."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = bool(skip_bad)
        self.objects: Counter = Counter()
        self.images: Counter = Counter()

    def image(self, reason: str, message: str, *, missing: bool = False) -> None:
        """An image that cannot be used (its file or its annotation file is missing or bad)."""
        if not self.skip_bad:
            raise (DatasetNotFoundError if missing else DatasetError)(message)
        self.images[reason] += 1

    def object(self, reason: str, message: str) -> None:
        """One bad object (row, box) of an image that is otherwise kept."""
        if not self.skip_bad:
            raise DatasetError(message)
        self.objects[reason] += 1

    def report(self, source: str) -> str | None:
        """Log the one warning counting what was skipped (if anything); returns its text."""
        summary = skip_summary(source, object=self.objects, image=self.images)
        if summary:
            log.warning("%s", summary)
        return summary


def check_class_names(names: Sequence[str] | None, *, setting: str = "data.class_names") -> list[str]:
    """The class names as a list of non-empty, distinct strings; ``ValueError`` naming ``setting`` otherwise."""
    if names is None or isinstance(names, (str, bytes)) or not len(names):
        raise ValueError(f"{setting} must be a non-empty list of class names, got {names!r}")
    out = [str(n).strip() for n in names]
    if any(not n for n in out):
        raise ValueError(f"{setting}: a class name is empty ({list(names)!r})")
    repeated = sorted({n for n in out if out.count(n) > 1})
    if repeated:
        raise ValueError(f"{setting}: class name(s) {repeated} appear more than once")
    return out


def header_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header only (the pixels are not decoded).

    The stored pixels' size: EXIF orientation is not applied, as :class:`datasets.CocoDetection` reads images."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"{path}: image file does not exist") from err
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable image ({err})") from err
    return int(height), int(width)


def coco_dict(images: list[dict], annotations: list[dict], class_names: Sequence[str], description: str) -> dict:
    """A COCO instances dict: class k is category id k + 1; annotation ids are numbered 1..N here."""
    for n, ann in enumerate(annotations, 1):
        ann["id"] = n
    return {
        "info": {"description": description},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(class_names)],
    }
