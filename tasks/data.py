"""Lightning data modules: datasets, samplers and loaders for the tasks."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import torch
from torch.utils.data import DataLoader

from datasets import (
    CocoDetection,
    DatasetError,
    DatasetNotFoundError,
    build_eval_transform,
    build_train_transform,
    collate_detection,
    synthetic_coco_root,
)

__all__ = ["CocoDataModule", "worker_init"]


def worker_init(worker_id: int) -> None:
    """Lightning's per-worker seeding, so augmentation is reproducible with ``seed=`` (torch already runs
    each worker with one thread)."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)

log = logging.getLogger(__name__)


class CocoDataModule(L.LightningDataModule):
    """A COCO-format folder: ``<root>/annotations/instances_<split>.json`` and ``<root>/<split>/*.jpg``.

    Args:
        root: dataset folder (COCO 2017 layout). With ``synthetic`` set, the cache folder under which the
            built-in synthetic dataset is generated once (its parameters pick a sub-folder).
        num_classes: classes the model predicts. With ``label_mode="contiguous"`` it must equal the number of
            categories in the annotations; with ``"category_id"`` (COCO's 90-class space) label = id - 1.
        image_size: square network input side.
        synthetic: parameters for :func:`datasets.synthetic_coco_root`, or ``None`` for real data.
        scale_range: train-time scale jitter.
        eval_backend: "pycocotools" or "faster_coco_eval".
    """

    def __init__(
        self,
        *,
        root: str | Path,
        num_classes: int,
        image_size: int,
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
    ) -> None:
        super().__init__()
        # The loader workers are the parallelism: OpenCV's own thread pool would oversubscribe the cores, and a
        # pool started before the workers fork can deadlock them. Set before any OpenCV call in this process.
        cv2.setNumThreads(1)
        self.root = Path(root).expanduser()
        self.num_classes = num_classes
        self.image_size = image_size
        self.train_split = train_split
        self.val_split = val_split
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.scale_range = tuple(scale_range)
        self.hflip_prob = hflip_prob
        self.min_box_size = min_box_size
        self.label_mode = label_mode
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.eval_backend = eval_backend
        self.train_dataset: CocoDetection | None = None
        self.val_dataset: CocoDetection | None = None

    # ------------------------------------------------------------------ paths
    @functools.cached_property
    def data_dir(self) -> Path:
        """The dataset folder; for synthetic data it is generated (once, atomically) on first use."""
        if self.synthetic is not None:
            return synthetic_coco_root(self.root, **self.synthetic)
        return self.root

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

    def prepare_data(self) -> None:
        self.data_dir  # noqa: B018 - generates the synthetic dataset on the preparing rank

    def _dataset(self, split: str, train: bool) -> CocoDetection:
        image_dir, ann_file = self.paths(split)
        if train:
            transform = build_train_transform(
                image_size=self.image_size, scale_range=self.scale_range, hflip_prob=self.hflip_prob
            )
        else:
            transform = build_eval_transform(image_size=self.image_size)
        ds = CocoDetection(
            image_dir=image_dir,
            ann_file=ann_file,
            transform=transform,
            min_box_size=self.min_box_size,
            label_mode=self.label_mode,
            num_classes=self.num_classes,
        )
        if ds.num_classes != self.num_classes:
            raise DatasetError(
                f"{ann_file}: has {ds.num_classes} categories but the model is configured for "
                f"data.num_classes={self.num_classes}"
            )
        return ds

    def setup(self, stage: str | None = None) -> None:
        self.check(
            (self.val_split,) if stage in ("validate", "test") else (self.train_split, self.val_split)
        )
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_split, train=True)
        if self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_split, train=False)

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
        from .coco_eval import CocoEvaluator

        return CocoEvaluator(self.val_dataset.coco, backend=self.eval_backend)

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds, *, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_detection,
            worker_init_fn=worker_init if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        drop_last = len(self.train_dataset) > self.batch_size
        return self._loader(self.train_dataset, batch_size=self.batch_size, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False, drop_last=False)
