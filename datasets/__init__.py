"""Datasets: COCO-format, Pascal VOC and YOLO txt detection and Cityscapes-layout / folder segmentation, their
albumentations pipelines and the built-in synthetic data.

Every loader raises :class:`DatasetError` (bad data) or :class:`DatasetNotFoundError` (missing data) with a
message that names the file, so the tools can print one line instead of a traceback.
"""

from ._coco_dict import check_class_names
from ._imageio import check_image_file
from .cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELS,
    CITYSCAPES_PALETTE,
    LABEL_ID_TO_TRAIN_ID,
    TRAIN_ID_TO_LABEL_ID,
    VALID_LABEL_IDS,
    CityscapesLabel,
    CityscapesSegmentation,
    train_ids_to_label_ids,
)
from .coco import LABEL_MODES, CocoDetection, collate_detection
from .coco_annotations import load_coco_annotations
from .coco_names import COCO_CATEGORIES, coco_label_names
from .errors import DatasetError, DatasetNotFoundError
from .segmentation import IGNORE_INDEX, SegmentationDataset, collate_segmentation, default_palette
from .segmentation_folder import SegmentationFolder
from .segmentation_transforms import (
    SegmentationTransform,
    build_segmentation_eval_transform,
    build_segmentation_train_transform,
)
from .synthetic import SYNTHETIC_CATEGORIES, synthetic_coco_root, write_synthetic_coco
from .synthetic_cityscapes import (
    SYNTHETIC_CITYSCAPES_COLOURS,
    synthetic_cityscapes_root,
    write_synthetic_cityscapes,
)
from .transforms import DetectionTransform, build_eval_transform, build_train_transform
from .voc import VOC_CLASSES, load_voc, voc_split_files
from .yolo import load_yolo, read_yolo_names, yolo_split_dirs

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABELS",
    "CITYSCAPES_PALETTE",
    "COCO_CATEGORIES",
    "IGNORE_INDEX",
    "LABEL_ID_TO_TRAIN_ID",
    "LABEL_MODES",
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_CITYSCAPES_COLOURS",
    "TRAIN_ID_TO_LABEL_ID",
    "VALID_LABEL_IDS",
    "VOC_CLASSES",
    "CityscapesLabel",
    "CityscapesSegmentation",
    "CocoDetection",
    "DatasetError",
    "DatasetNotFoundError",
    "DetectionTransform",
    "SegmentationDataset",
    "SegmentationFolder",
    "SegmentationTransform",
    "build_eval_transform",
    "build_segmentation_eval_transform",
    "build_segmentation_train_transform",
    "build_train_transform",
    "check_class_names",
    "check_image_file",
    "coco_label_names",
    "collate_detection",
    "collate_segmentation",
    "default_palette",
    "load_coco_annotations",
    "load_voc",
    "load_yolo",
    "read_yolo_names",
    "synthetic_cityscapes_root",
    "synthetic_coco_root",
    "train_ids_to_label_ids",
    "voc_split_files",
    "write_synthetic_cityscapes",
    "write_synthetic_coco",
    "yolo_split_dirs",
]
