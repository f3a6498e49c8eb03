"""Lightning glue: tasks (LightningModules), data modules, callbacks and the train/eval runners."""

from .callbacks import EMA
from .data import CocoDataModule
from .detection import DetectionTask

__all__ = ["EMA", "CocoDataModule", "DetectionTask"]
