"""Training: tasks (LightningModules), data modules, callbacks, checkpoints and the train/eval runners.

Names are imported on first use, so ``tasks.config`` (used by every tool at start-up) does not pull in
Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DenseTask": ".base",
    "EMA": ".callbacks",
    "CocoDataModule": ".coco_datamodule",
    "VocDataModule": ".voc_datamodule",
    "YoloDataModule": ".yolo_datamodule",
    "SegmentationDataModule": ".segmentation_datamodule",
    "DetectionTask": ".detection",
    "SegmentationTask": ".segmentation",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 -- the lazily imported names below


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
