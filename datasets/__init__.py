"""Datasets: COCO-format detection, its albumentations pipelines and the built-in synthetic data.

Every loader raises :class:`DatasetError` (bad data) or :class:`DatasetNotFoundError` (missing data) with a
message that names the file, so the tools can print one line instead of a traceback.
"""

from .coco import LABEL_MODES, CocoDetection, collate_detection, load_coco_annotations
from .errors import DatasetError, DatasetNotFoundError
from .synthetic import SYNTHETIC_CATEGORIES, synthetic_coco_root, write_synthetic_coco
from .transforms import DetectionTransform, build_eval_transform, build_train_transform

__all__ = [
    "LABEL_MODES",
    "SYNTHETIC_CATEGORIES",
    "CocoDetection",
    "DatasetError",
    "DatasetNotFoundError",
    "DetectionTransform",
    "build_eval_transform",
    "build_train_transform",
    "collate_detection",
    "load_coco_annotations",
    "synthetic_coco_root",
    "write_synthetic_coco",
]
