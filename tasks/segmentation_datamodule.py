"""The data module of semantic segmentation data (:class:`SegmentationDataModule`): Cityscapes or a folder of
images and mask PNGs."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from datasets import (
    CityscapesSegmentation,
    DatasetError,
    DatasetNotFoundError,
    SegmentationFolder,
    build_segmentation_eval_transform,
    build_segmentation_train_transform,
    collate_segmentation,
    synthetic_cityscapes_root,
)

from .datamodule import FolderDataModule

__all__ = ["SEGMENTATION_FORMATS", "SegmentationDataModule"]

SEGMENTATION_FORMATS = ("cityscapes", "folder")


class SegmentationDataModule(FolderDataModule):
    """Semantic segmentation data: a Cityscapes folder or a generic folder of images and mask PNGs.

    Layouts:
        ``format="cityscapes"``: ``<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
        ``<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png`` (label ids mapped to the 19 train ids on the fly).
        ``format="folder"``: ``<root>/<image_folder>/<split>/<name>.{jpg,png}`` and
        ``<root>/<mask_folder>/<split>/<name>.png``, single-channel masks holding class indices plus
        ``label_offset`` or ``ignore_index``; ``class_names`` are required. ADE20K is this format with
        ``image_folder="images"``, ``mask_folder="annotations"``, splits ``training``/``validation``,
        ``ignore_index=0`` and ``label_offset=1`` (configs/dataset/segmentation/ade20k.yaml).

    Args:
        num_classes: classes the model predicts; must match the dataset (19 for Cityscapes).
        crop_size: train crop (H, W); ``base_size`` optionally resizes train images first.
        scale_range, hflip_prob, color_jitter: train augmentation.
        eval_size: resize eval images to (H, W) (``None``: original size); predictions and metrics are always at
            the original size.
        size_divisor: eval batches are padded to a multiple of it (the model's coarsest stride).
        synthetic: parameters for :func:`datasets.synthetic_cityscapes_root` (``None`` for real data).
        overlays: with prediction writing, also write colour overlays.
        skip_bad: skip images without a mask and unreadable samples with a warning, instead of failing (see
            :class:`datasets.SegmentationDataset`).
        label_offset: ``format="folder"``: the mask value of class 0 (see :class:`datasets.SegmentationFolder`).
        decoded_cache: a folder where every image/mask pair is kept decoded (raw uint8 arrays, memory-mapped
            when read; :class:`datasets.SegmentationDataset`), so loader workers do not decode the PNGs again.
            ``None``: decode every time.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        num_classes: int,
        format: str = "cityscapes",
        class_names: list[str] | None = None,
        ignore_index: int = 255,
        image_folder: str = "images",
        mask_folder: str = "masks",
        train_split: str = "train",
        val_split: str = "val",
        crop_size: tuple[int, int] = (512, 1024),
        base_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip_prob: float = 0.5,
        color_jitter: float = 0.2,
        eval_size: tuple[int, int] | None = None,
        size_divisor: int = 128,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        synthetic: dict[str, Any] | None = None,
        overlays: bool = False,
        skip_bad: bool = False,
        decoded_cache: str | Path | None = None,
        seed: int = 0,
        label_offset: int = 0,
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
        if format not in SEGMENTATION_FORMATS:
            raise ValueError(f"data.format must be one of {SEGMENTATION_FORMATS}, got {format!r}")
        if format == "folder" and not class_names:
            raise ValueError("data.format=folder needs data.class_names (one name per class index)")
        if format != "folder" and label_offset:
            raise ValueError(f"data.label_offset applies to data.format=folder only, got {label_offset} for {format}")
        self.format = format
        self.label_offset = int(label_offset)
        self.num_classes = num_classes
        self.class_names_cfg = list(class_names) if class_names else None
        self.ignore_index = ignore_index
        self.image_folder = image_folder
        self.mask_folder = mask_folder
        self.train_split = train_split
        self.val_split = val_split
        self.crop_size = _pair_or_none(crop_size)
        self.base_size = _pair_or_none(base_size)
        self.scale_range = tuple(scale_range)
        self.hflip_prob = hflip_prob
        self.color_jitter = color_jitter
        self.eval_size = _pair_or_none(eval_size)
        self.size_divisor = int(size_divisor)
        self.overlays = overlays
        self.skip_bad = bool(skip_bad)
        self.decoded_cache = decoded_cache  # the datasets take it as given (None or "": off)
        self.collate_fn = functools.partial(collate_segmentation, size_divisor=self.size_divisor)

    def _generate_synthetic(self, cache_dir: Path, params: dict[str, Any]) -> Path:
        return synthetic_cityscapes_root(cache_dir, **params)

    def paths(self, split: str) -> tuple[Path, ...]:
        d = self.data_dir
        if self.format == "cityscapes":
            return d / "leftImg8bit" / split, d / "gtFine" / split
        return d / self.image_folder / split, d / self.mask_folder / split

    def check(self, splits: tuple[str, ...] | None = None) -> None:
        """Fail early, with one clear message, when the dataset is not where the config says."""
        if self.synthetic is not None:
            return
        for split in splits or (self.train_split, self.val_split):
            for path in self.paths(split):
                if not path.is_dir():
                    layout = (
                        f"leftImg8bit/{split}/<city>/ and gtFine/{split}/<city>/"
                        if self.format == "cityscapes"
                        else f"{self.image_folder}/{split}/ and {self.mask_folder}/{split}/"
                    )
                    raise DatasetNotFoundError(
                        f"{self.format} segmentation data not found: {path} does not exist (data.root={self.root}). "
                        f"Point data.root at a folder with {layout} (or set EFFDENSE_DATA_ROOT), "
                        "or try data=synthetic for the built-in dataset."
                    )

    def _dataset(self, split: str, train: bool):
        if train:
            transform = build_segmentation_train_transform(
                crop_size=self.crop_size,
                scale_range=self.scale_range,
                base_size=self.base_size,
                hflip_prob=self.hflip_prob,
                color_jitter=self.color_jitter,
                seed=self.seed,
            )
        else:
            transform = build_segmentation_eval_transform(eval_size=self.eval_size)
        if self.format == "cityscapes":
            ds = CityscapesSegmentation(
                root=self.data_dir, split=split, transform=transform, skip_bad=self.skip_bad,
                decoded_cache=self.decoded_cache,
            )
        else:
            image_dir, mask_dir = self.paths(split)
            ds = SegmentationFolder(
                image_dir=image_dir,
                mask_dir=mask_dir,
                class_names=self.class_names_cfg,
                ignore_index=self.ignore_index,
                label_offset=self.label_offset,
                transform=transform,
                skip_bad=self.skip_bad,
                decoded_cache=self.decoded_cache,
            )
        if ds.num_classes != self.num_classes:
            raise DatasetError(
                f"{self.paths(split)[0]}: the dataset has {ds.num_classes} classes but the model is configured "
                f"for data.num_classes={self.num_classes}"
            )
        return ds

    @property
    def class_names(self) -> list[str]:
        return list(self.val_dataset.class_names)

    def make_writer(self, out_dir: Path):
        """A writer of prediction PNGs (dataset label ids) and, with ``overlays``, colour overlays."""
        from evaluation.seg_writer import SegmentationWriter

        return SegmentationWriter(self.val_dataset, out_dir, overlays=self.overlays)


def _pair_or_none(v) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    a, b = (int(x) for x in v)
    return (a, b)
