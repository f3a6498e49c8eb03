"""Cityscapes semantic segmentation: the official label table, the labelIds <-> trainIds lookup tables and
the dataset of a Cityscapes-layout folder.

Layout (as distributed, and as written by :func:`datasets.write_synthetic_cityscapes`)::

    root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The masks store label ids (the ``id`` column of the table); the dataset maps them to the 19 train ids on the
fly (255 = ignore). Predictions go back to label ids with :func:`train_ids_to_label_ids`, the format the
official evaluation (``cityscapesscripts``) reads: ``<city>_<seq>_<frame>_leftImg8bit.png`` files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DatasetNotFoundError
from .segmentation import IGNORE_INDEX, SegmentationDataset, pair_files

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABELS",
    "CITYSCAPES_PALETTE",
    "LABEL_ID_TO_TRAIN_ID",
    "TRAIN_ID_TO_LABEL_ID",
    "VALID_LABEL_IDS",
    "CityscapesLabel",
    "CityscapesSegmentation",
    "train_ids_to_label_ids",
]


class CityscapesLabel(NamedTuple):
    """One row of the official Cityscapes label table (``cityscapesscripts.helpers.labels``)."""

    name: str
    id: int
    train_id: int  # 255 (or -1 for the license plate) = not evaluated
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


_L = CityscapesLabel
#: The official table: 35 labels, ``unlabeled`` (0) ... ``bicycle`` (33), ``license plate`` (-1).
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = (
    _L("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
    _L("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
    _L("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
    _L("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
    _L("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
    _L("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
    _L("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
    _L("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
    _L("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
    _L("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
    _L("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
    _L("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
    _L("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
    _L("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
    _L("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
    _L("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
    _L("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
    _L("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
    _L("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
    _L("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
    _L("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
    _L("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
    _L("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
    _L("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
    _L("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
    _L("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
    _L("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
    _L("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
    _L("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
    _L("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
    _L("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
    _L("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
    _L("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
    _L("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
    _L("license plate", -1, -1, "vehicle", 7, False, True, (0, 0, 142)),
)
del _L

_EVALUATED = sorted(
    (lab for lab in CITYSCAPES_LABELS if 0 <= lab.train_id < IGNORE_INDEX), key=lambda lab: lab.train_id
)
#: The 19 evaluated classes in train-id order (road, sidewalk, ..., bicycle).
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(lab.name for lab in _EVALUATED)
#: Their official colours (RGB), in train-id order.
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(lab.color for lab in _EVALUATED)


def _tables():
    to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    for lab in CITYSCAPES_LABELS:
        if lab.id >= 0:
            valid[lab.id] = True
            to_train[lab.id] = lab.train_id if 0 <= lab.train_id < IGNORE_INDEX else IGNORE_INDEX
    to_label = np.asarray([lab.id for lab in _EVALUATED], dtype=np.uint8)
    for table in (to_train, valid, to_label):
        table.flags.writeable = False
    return to_train, valid, to_label


#: uint8 ``[256]``: label id -> train id (255 for ignored labels and for ids not in the table).
#: ``VALID_LABEL_IDS``: bool ``[256]``, True for the ids of the table (0..33).
#: ``TRAIN_ID_TO_LABEL_ID``: uint8 ``[19]``: train id -> label id.
LABEL_ID_TO_TRAIN_ID, VALID_LABEL_IDS, TRAIN_ID_TO_LABEL_ID = _tables()

_NUM_CLASSES = len(CITYSCAPES_CLASSES)


def train_ids_to_label_ids(pred: np.ndarray) -> np.ndarray:
    """Map a train-id mask (``0..18``, 255 = ignore) to label ids (uint8), the official submission format.

    Ignored pixels (255) become ``unlabeled`` (0): the official evaluation rejects 255 but accepts 0 (and counts
    it as a miss). Any other value outside ``0..18`` raises ``ValueError``.
    """
    pred = np.asarray(pred)
    if pred.dtype == bool or not np.issubdtype(pred.dtype, np.integer):
        raise ValueError(f"expected an integer train-id mask, got dtype {pred.dtype}")
    bad = (pred < 0) | ((pred >= _NUM_CLASSES) & (pred != IGNORE_INDEX))
    if bad.any():
        raise ValueError(
            f"train ids must be 0..{_NUM_CLASSES - 1} or {IGNORE_INDEX}, got {np.unique(pred[bad]).tolist()}"
        )
    lut = np.zeros(256, dtype=np.uint8)  # 255 -> 0 (unlabeled)
    lut[:_NUM_CLASSES] = TRAIN_ID_TO_LABEL_ID
    return lut[pred.astype(np.uint8)]


_IMAGE_SUFFIX = "_leftImg8bit.png"
_MASK_SUFFIX = "_gtFine_labelIds.png"


class CityscapesSegmentation(SegmentationDataset):
    """The fine annotations of a Cityscapes-layout folder (see the module docstring for the layout).

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"``, ``"test"`` or any other sub-folder of ``leftImg8bit/``.
        transform: ``(image HxWx3 uint8 RGB, mask HxW uint8 train ids) -> dict(image, mask)``, e.g.
            :func:`datasets.build_segmentation_train_transform`; None keeps both unchanged.
        check_labels: raise :class:`DatasetError` naming the file and the ids when a mask holds a label id that
            is not in the official table (costs one ``bincount`` per mask).
        skip_bad: skip bad input instead of raising :class:`DatasetError`: images without an annotation are
            dropped (one warning counts them); a sample whose image or mask turns out corrupt, truncated, of the
            wrong size or holding unknown label ids is replaced by the next usable one and named in a warning.
        decoded_cache: a folder keeping every pair decoded, so a frame's two PNGs are decoded once (see
            :class:`datasets.decoded_cache.DecodedCache`).

    Images are sorted by path. ``output_name(i)`` is ``"<city>_<seq>_<frame>"``: write a prediction as
    ``<output_name>_leftImg8bit.png`` holding ``label_ids_for_output(pred)`` for the official evaluation.
    Samples are described in :mod:`datasets.segmentation`.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        split: str,
        transform: Callable | None = None,
        check_labels: bool = True,
        skip_bad: bool = False,
        decoded_cache: str | Path | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = str(split)
        image_dir = self.root / "leftImg8bit" / self.split
        mask_dir = self.root / "gtFine" / self.split
        expected = (
            "expected the Cityscapes layout "
            f"<root>/leftImg8bit/{self.split}/<city>/<city>_<seq>_<frame>{_IMAGE_SUFFIX} "
            f"with <root>/gtFine/{self.split}/<city>/<city>_<seq>_<frame>{_MASK_SUFFIX}"
        )
        if not image_dir.is_dir():
            raise DatasetNotFoundError(f"image folder not found: {image_dir}; {expected}")
        images = sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}"))
        if not images:
            raise DatasetNotFoundError(
                f"{image_dir}: no *{_IMAGE_SUFFIX} images in its city folders; {expected}"
            )
        names = [p.name[: -len(_IMAGE_SUFFIX)] for p in images]
        masks = [mask_dir / p.parent.name / f"{name}{_MASK_SUFFIX}" for p, name in zip(images, names)]
        images, masks, self.skipped = pair_files(
            images, masks, skip_bad=skip_bad, source=image_dir, what="annotation"
        )
        names = [p.name[: -len(_IMAGE_SUFFIX)] for p in images]
        super().__init__(
            image_paths=images,
            mask_paths=masks,
            output_names=names,
            class_names=CITYSCAPES_CLASSES,
            palette=CITYSCAPES_PALETTE,
            value_to_train_id=LABEL_ID_TO_TRAIN_ID,
            valid_values=VALID_LABEL_IDS,
            transform=transform,
            check_labels=check_labels,
            label_hint="not label ids of the official Cityscapes table (0..33); is this a *_labelIds.png mask?",
            skip_bad=skip_bad,
            source=image_dir,
            decoded_cache=decoded_cache,
        )

    def prediction_file_name(self, index: int) -> str:
        """``<city>_<seq>_<frame>_leftImg8bit.png``, the name the official evaluation matches to the image."""
        return f"{self.output_name(index)}{_IMAGE_SUFFIX}"

    def label_ids_for_output(self, train_ids: np.ndarray) -> np.ndarray:
        """Map a predicted train-id mask to label ids (see :func:`train_ids_to_label_ids`)."""
        return train_ids_to_label_ids(train_ids)
