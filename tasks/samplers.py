"""Samplers: a resumable, seeded training order and an unpadded one for multi-process evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ResumableRandomSampler", "UnpaddedDistributedSampler"]


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``n`` gets images ``r, r + n, r + 2n, ...`` in order, and nothing else.

    ``DistributedSampler`` pads the split with repeated images so every rank gets the same number, which would
    count those images twice in a metric. Evaluation needs every image exactly once, so ranks may get one
    image fewer than others here (the metrics gather/reduce once per epoch, so uneven counts are fine).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = max(0, math.ceil((len(self.dataset) - self.rank) / self.num_replicas))
        self.total_size = len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class ResumableRandomSampler(DistributedSampler):
    """Training order fixed by ``(seed, epoch)`` and sharded over processes, that a resumed run can continue
    in the middle of an epoch.

    It yields *sample keys* ``(epoch + 1) * len(dataset) + i`` rather than plain indices ``i``; the project's
    datasets read image ``i`` and seed its augmentation from the key, so what a sample looks like depends only on
    ``(seed, epoch, i)`` -- not on the process, the number of loader workers or how many draws came before.
    :meth:`resume` makes the next iteration over ``epoch`` skip the first ``position`` samples of this process's
    shard (the ones a checkpoint says were already trained on).
    """

    def __init__(self, dataset: Dataset, *, seed: int, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed),
                         drop_last=drop_last)
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, position: int) -> None:
        self._resume = (int(epoch), int(position))
        # Loaders with workers may create their first iterator before the epoch is set on the sampler.
        self.set_epoch(int(epoch))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())  # shuffled with seed + epoch, padded and sharded
        start = 0
        # Kept until the resumed epoch is iterated: loaders may create an iterator before the epoch is set.
        if self._resume is not None and self._resume[0] == self.epoch:
            start = min(self._resume[1], len(indices))
            self._resume = None
        elif self._resume is not None and self.epoch > self._resume[0]:
            self._resume = None
        offset = (self.epoch + 1) * len(self.dataset)
        return iter([offset + i for i in indices[start:]])
