"""Datasets: COCO-format detection, albumentations pipelines and the built-in synthetic data."""

from .coco import LABEL_MODES, CocoDetection, collate_detection, load_coco_annotations
from .errors import DatasetError, DatasetNotFoundError
from .synthetic import SYNTHETIC_CATEGORIES, synthetic_coco_root, write_synthetic_coco
from .transforms import DetectionTransform, build_eval_transform, build_train_transform

__all__ = [
    "CocoDetection",
    "collate_detection",
    "load_coco_annotations",
    "LABEL_MODES",
    "DatasetError",
    "DatasetNotFoundError",
    "SYNTHETIC_CATEGORIES",
    "synthetic_coco_root",
    "write_synthetic_coco",
    "DetectionTransform",
    "build_eval_transform",
    "build_train_transform",
]
