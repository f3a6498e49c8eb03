"""The data module of COCO-format detection data (:class:`CocoDataModule`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import (
    CocoDetection,
    DatasetError,
    DatasetNotFoundError,
    build_eval_transform,
    build_train_transform,
    collate_detection,
    synthetic_coco_root,
)

from .datamodule import FolderDataModule

__all__ = ["CocoDataModule"]


class CocoDataModule(FolderDataModule):
    """A COCO-format folder: ``<root>/annotations/instances_<split>.json`` and ``<root>/<split>/*.jpg``.

    Args:
        root: dataset folder (COCO 2017 layout). With ``synthetic`` set, the cache folder under which the
            built-in synthetic dataset is generated once (its parameters pick a sub-folder).
        num_classes: classes the model predicts. With ``label_mode="contiguous"`` it must equal the number of
            categories in the annotations; with ``"category_id"`` (COCO's 90-class space) label = id - 1.
        image_size: network input size: one side (a square) or ``[H, W]``; evaluation letterboxes into it.
        synthetic: parameters for :func:`datasets.synthetic_coco_root`, or ``None`` for real data.
        scale_range: train-time scale jitter.
        eval_backend: "pycocotools" or "faster_coco_eval".
        seed: fixes the training order and augmentation per (seed, epoch, sample), so resumed runs repeat exactly.
        skip_bad: skip bad annotations and unreadable images with a warning that counts them, instead of
            failing on the first (see :class:`datasets.CocoDetection`).
    """

    def __init__(
        self,
        *,
        root: str | Path,
        num_classes: int,
        image_size: int | Sequence[int],
        train_split: str = "train2017",
        val_split: str = "val2017",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        scale_range: tuple[float, float] = (0.1, 2.0),
        hflip_prob: float = 0.5,
        min_box_size: float = 1.0,
        label_mode: str = "contiguous",
        synthetic: dict[str, Any] | None = None,
        eval_backend: str = "pycocotools",
        skip_bad: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            root=root,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            synthetic=synthetic,
            seed=seed,
        )
        self.num_classes = num_classes
        self.image_size = image_size
        self.train_split = train_split
        self.val_split = val_split
        self.scale_range = tuple(scale_range)
        self.hflip_prob = hflip_prob
        self.min_box_size = min_box_size
        self.label_mode = label_mode
        self.eval_backend = eval_backend
        self.skip_bad = bool(skip_bad)

    collate_fn = staticmethod(collate_detection)

    def _generate_synthetic(self, cache_dir: Path, params: dict[str, Any]) -> Path:
        return synthetic_coco_root(cache_dir, **params)

    def paths(self, split: str) -> tuple[Path, Path]:
        d = self.data_dir
        return d / split, d / "annotations" / f"instances_{split}.json"

    def check(self, splits: tuple[str, ...] | None = None) -> None:
        """Fail early, with one clear message, when the dataset is not where the config says."""
        if self.synthetic is not None:
            return
        for split in splits or (self.train_split, self.val_split):
            image_dir, ann_file = self.paths(split)
            for path in (ann_file, image_dir):
                if not path.exists():
                    raise DatasetNotFoundError(
                        f"COCO-format data not found: {path} does not exist (data.root={self.root}). "
                        f"Point data.root at a folder with annotations/instances_{split}.json and {split}/ "
                        "(or set EFFDENSE_DATA_ROOT), or try data=synthetic for the built-in dataset."
                    )

    def _annotations(self, split: str) -> dict[str, Any]:
        """Where :class:`datasets.CocoDetection` finds ``split``: ``image_dir`` and ``ann_file``, or (formats read into
        memory) ``image_dir``, ``annotations`` and ``source``."""
        image_dir, ann_file = self.paths(split)
        return {"image_dir": image_dir, "ann_file": ann_file}

    def _dataset(self, split: str, train: bool) -> CocoDetection:
        if train:
            transform = build_train_transform(
                image_size=self.image_size, scale_range=self.scale_range, hflip_prob=self.hflip_prob, seed=self.seed
            )
        else:
            transform = build_eval_transform(image_size=self.image_size)
        ds = CocoDetection(
            **self._annotations(split),
            transform=transform,
            min_box_size=self.min_box_size,
            label_mode=self.label_mode,
            num_classes=self.num_classes,
            skip_bad=self.skip_bad,
        )
        if ds.num_classes != self.num_classes:
            raise DatasetError(
                f"{ds.source}: has {ds.num_classes} categories but the model is configured for "
                f"data.num_classes={self.num_classes}"
            )
        return ds

    # ------------------------------------------------------------------ evaluation helpers
    @property
    def category_ids(self) -> list[int]:
        """Dataset category id of each label; -1 for labels with no category in the annotations (the unused
        ids of COCO's 90-class space), whose detections are not evaluated."""
        present = {c["id"] for c in self.val_dataset.coco.dataset["categories"]}
        return [cid if cid in present else -1 for cid in self.val_dataset.cat_ids]

    @property
    def class_names(self) -> list[str]:
        return list(self.val_dataset.class_names)

    def make_evaluator(self):
        from evaluation.coco import CocoEvaluator

        return CocoEvaluator(self.val_dataset.coco, backend=self.eval_backend)
