"""Samplers for multi-process evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler

__all__ = ["UnpaddedDistributedSampler"]


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
