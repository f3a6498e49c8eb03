"""What the data modules share (:class:`FolderDataModule`): real data under a folder or a synthetic copy generated
once into a cache, the early "data not found" and validation-image checks, the resumable training order and the
loaders, among them the fixed batches that BatchNorm statistics are recomputed over."""

from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import torch
from torch.utils.data import DataLoader

from datasets import check_image_file
from utils.distributed import is_distributed, rank_and_world

from .samplers import ResumableRandomSampler, UnpaddedDistributedSampler

__all__ = ["NORM_STATISTICS_EPOCH", "FolderDataModule", "worker_init"]

#: The epoch whose sample keys fix the augmentation of the BatchNorm-statistics batches: one no run reaches.
NORM_STATISTICS_EPOCH = 2**32


def worker_init(worker_id: int) -> None:
    """Lightning's per-worker seeding, so augmentation is reproducible with ``seed=`` (torch already runs
    each worker with one thread). Ctrl-C is left to the main process, which stops after the current step
    (:class:`tasks.interrupt.StopOnSignal`); a worker stopped by it would fail that step."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class FolderDataModule(L.LightningDataModule):
    """Shared by the data modules: real data under ``root`` or a synthetic copy generated once into a cache,
    the early "data not found" check, and the loaders. Subclasses set ``train_split``, ``val_split`` and
    ``skip_bad`` and implement :meth:`check` and :meth:`_dataset`."""

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

    def check(self, splits: tuple[str, ...] | None = None) -> None:
        raise NotImplementedError

    def _dataset(self, split: str, train: bool):
        raise NotImplementedError

    def dataset(self, split: str, *, train: bool):
        """A new dataset of ``split`` with the training (augmenting) or the evaluation transform, e.g. to look at a
        split as the other transform delivers it (``tools/show_data.py``)."""
        return self._dataset(split, train)

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
