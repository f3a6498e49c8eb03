"""Lightning glue: tasks (LightningModules), data modules, callbacks and the train/eval runners."""

from .base import DenseTask
from .callbacks import EMA
from .data import CocoDataModule, SegmentationDataModule
from .detection import DetectionTask
from .segmentation import SegmentationTask

__all__ = ["EMA", "CocoDataModule", "DenseTask", "DetectionTask", "SegmentationDataModule", "SegmentationTask"]
