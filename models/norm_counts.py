"""BatchNorm's batch counters advanced in one operation per training step, instead of one per layer.

In training, every BatchNorm layer adds 1 to its ``num_batches_tracked`` buffer when it runs: one tiny kernel per
layer and step (108 of the 2,241 operations of an EfficientDet-D0 training step in bf16, 171 layers at D3). The
count enters the arithmetic only for a layer without ``momentum`` (a cumulative average); with a momentum it is
bookkeeping. While :func:`deferred_counts` is active, each such layer's counter is replaced by a host-side stand-in
that counts the layer's calls in Python; afterwards the counters are put back and advanced by those counts in one
multi-tensor operation (one per distinct count), so every counter ends where the layers would have left it, and
running means and variances are computed exactly as before.

Only layers whose ``forward`` is known to treat the counter this way take part: PyTorch's ``BatchNorm1d/2d/3d``
(not ``SyncBatchNorm``, which requires a tensor) and timm's ``BatchNormAct2d``, in training mode, tracking running
statistics, with a momentum. Any other layer counts for itself, as usual.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["counted_norms", "deferred_counts"]


@functools.cache
def _known_forwards() -> frozenset:
    forwards = {nn.modules.batchnorm._BatchNorm.forward}
    try:  # timm's BatchNorm + activation: the same counter logic as PyTorch's
        from timm.layers import BatchNormAct2d

        forwards.add(BatchNormAct2d.forward)
    except ImportError:
        pass
    return frozenset(forwards)


def counted_norms(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose counters :func:`deferred_counts` can advance (found once; a walk over the
    modules, about 1 ms at D3, is too slow for every step)."""
    known = _known_forwards()
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward in known]


class _CallCount:
    """Stands in for a layer's ``num_batches_tracked`` during a forward pass: ``add_(1)`` counts on the host."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0

    def add_(self, value) -> _CallCount:
        self.calls += int(value)
        return self


@contextlib.contextmanager
def deferred_counts(norms: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, the layers of ``norms`` (from :func:`counted_norms`) that are training with a momentum and a
    counter count their calls on the host; on leaving it (also after an error) each counter is put back and
    advanced by its layer's calls."""
    swapped = []
    for m in norms:
        counter = m._buffers.get("num_batches_tracked")
        if m.training and m.track_running_stats and m.momentum is not None and isinstance(counter, torch.Tensor):
            stand_in = _CallCount()
            m._buffers["num_batches_tracked"] = stand_in
            swapped.append((m, counter, stand_in))
    try:
        yield
    finally:
        by_calls: dict[tuple[int, torch.device], list[torch.Tensor]] = defaultdict(list)
        for m, counter, stand_in in swapped:
            m._buffers["num_batches_tracked"] = counter
            if stand_in.calls:
                by_calls[stand_in.calls, counter.device].append(counter)
        for (calls, _), counters in by_calls.items():
            torch._foreach_add_(counters, calls)
