"""The data module of YOLO txt detection data (:class:`YoloDataModule`), read into memory as COCO-format
annotations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasets import check_class_names, load_yolo, read_yolo_names, yolo_split_dirs

from .coco_datamodule import CocoDataModule

__all__ = ["YoloDataModule"]


class YoloDataModule(CocoDataModule):
    """YOLO txt: ``<root>/images/<split>/`` with ``<root>/labels/<split>/*.txt`` (or ``<root>/<split>/images`` with
    ``<root>/<split>/labels``); see :mod:`datasets.yolo` for the rows and coordinates.

    Args:
        class_names: the class of each class index; ``None``: the ``names`` of the dataset YAML
            (:func:`datasets.read_yolo_names`; the configs read them so, to count the classes).
        yaml_file: that YAML, relative to ``root``; ``None``: the one ``*.yaml`` file in ``root``.
        train_split, val_split: the split folders.
        **kwargs: the options of :class:`tasks.CocoDataModule` (``num_classes`` must equal the number of class names).
    """

    format = "yolo"

    def __init__(
        self,
        *,
        class_names: Sequence[str] | None = None,
        yaml_file: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        **kwargs: Any,
    ) -> None:
        super().__init__(train_split=train_split, val_split=val_split, **kwargs)
        if self.synthetic is not None:
            raise ValueError("data.synthetic: data=yolo reads a YOLO folder; the generated dataset is data=synthetic")
        if class_names is None:
            class_names = read_yolo_names(self.data_dir, yaml_file)
        self.yolo_class_names = check_class_names(class_names)
        if self.num_classes != len(self.yolo_class_names):
            raise ValueError(f"data.num_classes={self.num_classes}, but data.class_names has "
                             f"{len(self.yolo_class_names)} names")

    def check(self, splits: tuple[str, ...] | None = None) -> None:
        """Fail early, with one clear message, when a split folder is not where the config says."""
        for split in splits or (self.train_split, self.val_split):
            yolo_split_dirs(self.data_dir, split)

    def _annotations(self, split: str) -> dict[str, Any]:
        image_dir, label_dir = yolo_split_dirs(self.data_dir, split)
        data, source = load_yolo(image_dir, label_dir, class_names=self.yolo_class_names, skip_bad=self.skip_bad)
        return {"image_dir": image_dir, "annotations": data, "source": source}
