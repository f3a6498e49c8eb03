"""The data module of Pascal VOC detection data (:class:`VocDataModule`): a VOCdevkit, or any folder in the VOC layout
(labelImg and CVAT exports), read into memory as COCO-format annotations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import VOC_CLASSES, check_class_names, load_voc, voc_split_files

from .coco_datamodule import CocoDataModule

__all__ = ["VocDataModule"]


class VocDataModule(CocoDataModule):
    """Pascal VOC: ``<root>/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}`` for each of ``years`` (``None`` or
    empty: ``root`` itself is one VOC folder). See :mod:`datasets.voc` for the coordinates and difficult objects.

    Args:
        class_names: the class of each label, as the XML files name them (default: the 20 VOC classes).
        years: VOCdevkit years read. The training split is read from each of them; the val split from those that
            have it (VOC2012's test annotations are not public, so ``val_split="test"`` reads VOC2007's).
        train_split, val_split: names of the split lists ``ImageSets/Main/<split>.txt``.
        **kwargs: the options of :class:`tasks.CocoDataModule` (``num_classes`` must equal the number of class names).

    Evaluation reports Pascal VOC's mAP at IoU 0.5 by both rules next to COCO's numbers
    (:class:`evaluation.voc.VocEvaluator`).
    """

    format = "voc"

    def __init__(
        self,
        *,
        class_names: Sequence[str] = VOC_CLASSES,
        years: Sequence[int] | int | None = (2007, 2012),
        train_split: str = "trainval",
        val_split: str = "test",
        **kwargs: Any,
    ) -> None:
        super().__init__(train_split=train_split, val_split=val_split, **kwargs)
        if self.synthetic is not None:
            raise ValueError("data.synthetic: data=voc reads a VOC folder; the generated dataset is data=synthetic")
        self.voc_class_names = check_class_names(class_names)
        if self.num_classes != len(self.voc_class_names):
            raise ValueError(f"data.num_classes={self.num_classes}, but data.class_names has "
                             f"{len(self.voc_class_names)} names")
        if isinstance(years, (int, str)):
            years = [years]
        try:
            self.years = [int(y) for y in years] if years else None
        except (TypeError, ValueError):
            raise ValueError(f"data.years must be a list of years such as [2007, 2012], or null; got {years!r}") from None

    def _split_files(self, split: str) -> list[Path]:
        return voc_split_files(self.data_dir, self.years, split, every_year=split == self.train_split)

    def check(self, splits: tuple[str, ...] | None = None) -> None:
        """Fail early, with one clear message, when a folder or split list is not where the config says."""
        for split in splits or (self.train_split, self.val_split):
            self._split_files(split)

    def _annotations(self, split: str) -> dict[str, Any]:
        data, source = load_voc(self._split_files(split), root=self.data_dir, class_names=self.voc_class_names,
                                skip_bad=self.skip_bad)
        return {"image_dir": self.data_dir, "annotations": data, "source": source}

    def make_evaluator(self):
        from evaluation.voc import VocEvaluator

        return VocEvaluator(self.val_dataset.coco, backend=self.eval_backend)
