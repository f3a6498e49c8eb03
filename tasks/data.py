"""Lightning data modules: datasets, samplers and loaders for the tasks."""

from __future__ import annotations

import functools
import logging
import signal
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import torch
from torch.utils.data import DataLoader

from datasets import (
    CityscapesSegmentation,
    CocoDetection,
    DatasetError,
    DatasetNotFoundError,
    SegmentationFolder,
    build_eval_transform,
    build_segmentation_eval_transform,
    build_segmentation_train_transform,
    build_train_transform,
    check_image_file,
    collate_detection,
    collate_segmentation,
    synthetic_cityscapes_root,
    synthetic_coco_root,
)
from utils.distributed import is_distributed, rank_and_world

from .samplers import ResumableRandomSampler, UnpaddedDistributedSampler

__all__ = ["CocoDataModule", "SegmentationDataModule", "worker_init"]


def worker_init(worker_id: int) -> None:
    """Lightning's per-worker seeding, so augmentation is reproducible with ``seed=`` (torch already runs
    each worker with one thread). Ctrl-C is left to the main process, which stops after the current step
    (:class:`tasks.interrupt.StopOnSignal`); a worker stopped by it would fail that step."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

log = logging.getLogger(__name__)

#: The epoch whose sample keys fix the augmentation of the BatchNorm-statistics batches: one no run reaches.
NORM_STATISTICS_EPOCH = 2**32


class _FolderDataModule(L.LightningDataModule):
    """Shared by the data modules: real data under ``root`` or a synthetic copy generated once into a cache,
    the early "data not found" check, and the loaders."""

    collate_fn = None

    def __init__(
        self,
        *,
        root: str | Path,
        batch_size: int,
        val_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
        synthetic: dict[str, Any] | None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        #: Fixes the training order and augmentation per (seed, epoch, sample); see ResumableRandomSampler.
        self.seed = int(seed)
        self.train_sampler: ResumableRandomSampler | None = None
        self._resume_state: dict[str, int] | None = None
        # The loader workers are the parallelism: OpenCV's own thread pool would oversubscribe the cores, and a
        # pool started before the workers fork can deadlock them. Set before any OpenCV call in this process.
        cv2.setNumThreads(1)
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.train_dataset = None
        self.val_dataset = None
        self._norm_eval_dataset = None

    def _generate_synthetic(self, cache_dir: Path, params: dict[str, Any]) -> Path:
        raise NotImplementedError

    @functools.cached_property
    def data_dir(self) -> Path:
        """The dataset folder; for synthetic data it is generated (once, atomically) on first use."""
        if self.synthetic is not None:
            return self._generate_synthetic(self.root, self.synthetic)
        return self.root

    def prepare_data(self) -> None:
        self.data_dir  # noqa: B018 - generates the synthetic dataset on the preparing rank

    # Subclasses set train_split / val_split and implement these two.
    def check(self, splits: tuple[str, ...] | None = None) -> None:
        raise NotImplementedError

    def _dataset(self, split: str, train: bool):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self.check((self.val_split,) if stage in ("validate", "test") else (self.train_split, self.val_split))
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_split, train=True)
        if self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_split, train=False)
            if stage in (None, "fit"):
                self._check_val_images()

    def _check_val_images(self) -> None:
        """Before training: every validation image decodes (a corrupt one is named now, not after the first epoch).
        With ``skip_bad`` the dataset skips such images itself."""
        if self.skip_bad:
            return
        for i in range(len(self.val_dataset)):
            check_image_file(self.val_dataset.image_path(i))

    def _loader(self, ds, *, batch_size: int, shuffle: bool, drop_last: bool, sampler=None,
                persistent: bool = True) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            # The loader's own generator: creating iterators does not draw from the global torch RNG, whose
            # state (stochastic depth) a checkpoint stores.
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=persistent and self.num_workers > 0,
            collate_fn=self.collate_fn,
            worker_init_fn=worker_init if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        drop_last = len(self.train_dataset) > self.batch_size
        rank, world = rank_and_world()
        # A DistributedSampler subclass: Lightning keeps it instead of adding its own.
        self.train_sampler = ResumableRandomSampler(self.train_dataset, seed=self.seed, num_replicas=world, rank=rank)
        if self._resume_state is not None:
            self.train_sampler.resume(self._resume_state["epoch"], self._resume_state["position"])
            self._resume_state = None
        return self._loader(
            self.train_dataset, batch_size=self.batch_size, shuffle=False, drop_last=drop_last,
            sampler=self.train_sampler,
        )

    def state_dict(self) -> dict[str, int]:
        """Where the training order stands: the epoch and how many samples of this process's shard were trained
        on (stored in checkpoints, so a run killed mid-epoch resumes with the next batch)."""
        trainer = self.trainer
        if trainer is None or self.train_sampler is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(trainer.current_epoch), "position": int(done) * int(self.batch_size)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self._resume_state = {"epoch": int(state["epoch"]), "position": int(state["position"])}

    def describe(self, split: str) -> dict[str, Any]:
        """What a split is, for logs and metrics.json: format, folder, split name, image count, generated or not."""
        ds = self.val_dataset if split == self.val_split else self.train_dataset
        return {"format": getattr(self, "format", "coco"), "root": str(self.data_dir), "split": split,
                "images": len(ds) if ds is not None else None, "synthetic": self.synthetic is not None}

    def norm_statistics_dataloader(self, num_batches: int, *, transform: str = "train") -> DataLoader:
        """Training batches for recomputing BatchNorm statistics (:class:`tasks.precise_bn.PreciseBN`).

        The same images every time: the first ``num_batches`` batches' worth per process of the training split in an
        order fixed by ``seed``, each image at most once (all of them when the split is smaller), shared out so every
        process runs the same number of batches. ``transform="train"`` augments each image in one fixed way (sample
        keys no training epoch uses); ``"eval"`` applies the evaluation transform."""
        if transform == "train":
            ds = self.train_dataset
        else:
            if self._norm_eval_dataset is None:
                self._norm_eval_dataset = self._dataset(self.train_split, train=False)
            ds = self._norm_eval_dataset
        rank, world = rank_and_world()
        n = len(ds)
        count = max(min(num_batches * self.batch_size * world, n) // world, 1) * world
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        order = [order[j % n] for j in range(count)]  # fewer images than processes: some repeat
        offset = NORM_STATISTICS_EPOCH * n if transform == "train" else 0
        return self._loader(ds, batch_size=self.batch_size, shuffle=False, drop_last=False,
                            sampler=[offset + i for i in order[rank::world]], persistent=False)

    def val_dataloader(self) -> DataLoader:
        # Under several processes every val image must be evaluated exactly once: no padding repeats
        # (Lightning leaves a DistributedSampler in place instead of adding its own).
        sampler = UnpaddedDistributedSampler(self.val_dataset) if is_distributed() else None
        return self._loader(
            self.val_dataset, batch_size=self.val_batch_size, shuffle=False, drop_last=False, sampler=sampler
        )


class CocoDataModule(_FolderDataModule):
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
        seed: fixes the training order and augmentation per (seed, epoch, sample), so resumed runs repeat exactly.
        skip_bad: skip bad annotations and unreadable images with a warning that counts them, instead of
            failing on the first (see :class:`datasets.CocoDetection`).
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

    def _dataset(self, split: str, train: bool) -> CocoDetection:
        image_dir, ann_file = self.paths(split)
        if train:
            transform = build_train_transform(
                image_size=self.image_size, scale_range=self.scale_range, hflip_prob=self.hflip_prob, seed=self.seed
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
            skip_bad=self.skip_bad,
        )
        if ds.num_classes != self.num_classes:
            raise DatasetError(
                f"{ann_file}: has {ds.num_classes} categories but the model is configured for "
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


SEGMENTATION_FORMATS = ("cityscapes", "folder")


class SegmentationDataModule(_FolderDataModule):
    """Semantic segmentation data: a Cityscapes folder or a generic folder of images and mask PNGs.

    Layouts:
        ``format="cityscapes"``: ``<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
        ``<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png`` (label ids mapped to the 19 train ids on the fly).
        ``format="folder"``: ``<root>/<image_folder>/<split>/<name>.{jpg,png}`` and
        ``<root>/<mask_folder>/<split>/<name>.png``, single-channel masks holding class indices
        ``0..num_classes-1`` or ``ignore_index``; ``class_names`` are required.

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
        decoded_cache: a folder where every image/mask pair is kept decoded (raw uint8 arrays, memory-mapped
            when read; :class:`datasets.SegmentationDataset`): decoding PNGs is most of a loader worker's time.
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
        self.format = format
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
