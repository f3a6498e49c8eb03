"""Per-process random generators for the train-time augmentations (shared by every transform)."""

from __future__ import annotations

import random

import numpy as np

__all__ = ["ProcessRandom", "sample_key_split"]


class ProcessRandom:
    """A numpy ``Generator`` and a Python ``random.Random`` that are re-seeded once per process.

    In a data-loader worker they are seeded from the worker's seed (which the loader derives from the main
    process' torch seed), mixed with ``seed`` when given, so workers draw different augmentations and runs with
    a fixed global seed repeat. In the main process they are seeded from ``seed``, or, when ``seed`` is None,
    from Python's global ``random`` module (seeded by ``lightning.seed_everything``).

    Call :meth:`refresh` at the start of every draw. ``pipeline`` (an albumentations ``Compose``) is handed the
    generators whenever they are re-seeded, so its draws follow the same per-process seeding.
    """

    def __init__(self, seed: int | None = None, *, pipeline=None) -> None:
        self.seed = None if seed is None else int(seed)
        self.pipeline = pipeline
        self._key: object = "unset"
        self.rng = np.random.default_rng()
        self.py_random = random.Random()
        self.refresh()

    def seed_sample(self, key: int) -> None:
        """Seed the generators from ``(seed, key)`` for one sample: augmentation then depends only on the sample
        key (see :class:`datasets.segmentation.SegmentationDataset` and ``CocoDetection``: the epoch and the
        index), not on the process or the order of draws -- which is what makes a resumed run repeat exactly."""
        seq = np.random.SeedSequence([0 if self.seed is None else self.seed, int(key)])
        self.rng = np.random.default_rng(seq)
        self.py_random = random.Random(int(seq.generate_state(1, np.uint64)[0]))
        self._key = "sample"  # the next refresh() re-seeds per process again
        if self.pipeline is not None:
            self.pipeline.set_random_state(self.rng, self.py_random)

    def refresh(self) -> bool:
        """Seed the generators for this process; no-op (False) when already done for it."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        key = (info.id, info.seed) if info is not None else None
        if key == self._key:
            return False
        self._key = key
        if info is not None:
            entropy = [info.seed % 2**63] + ([] if self.seed is None else [self.seed])
        else:
            entropy = [self.seed if self.seed is not None else random.getrandbits(63)]
        seq = np.random.SeedSequence(entropy)
        self.rng = np.random.default_rng(seq)
        self.py_random = random.Random(int(seq.generate_state(1, np.uint64)[0]))
        if self.pipeline is not None:
            self.pipeline.set_random_state(self.rng, self.py_random)
        return True


def sample_key_split(index: int, size: int) -> tuple[int, int | None]:
    """``(image index, sample key or None)``: indices in ``-size..size-1`` are plain indices (no key); an index at
    or beyond ``size`` is a sample key for image ``index % size``."""
    index = int(index)
    if size <= 0:
        raise IndexError("the dataset is empty")
    if index >= size:
        return index % size, index
    if not -size <= index < size:
        raise IndexError(f"index {index} out of range for a dataset of {size} images")
    return index % size, None
