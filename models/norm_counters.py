"""BatchNorm's batch counters advanced in one operation per training step instead of one per layer.

In training, every BatchNorm layer adds 1 to its ``num_batches_tracked`` buffer when it runs: one tiny kernel per
layer (108 of them per EfficientDet-D0 step on a GPU). With a ``momentum`` set (EfficientDet's norms, timm's, this
project's), the counter is bookkeeping only: the running statistics use the momentum. :func:`batched_norm_counters`
hides the counters while the forward pass runs, counts each layer's calls, and afterwards adds the counts with one
multi-tensor operation: the same buffers end with the same values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batched_norm_counters"]


@contextlib.contextmanager
def batched_norm_counters(module: nn.Module) -> Iterator[None]:
    """While the block runs, ``module``'s BatchNorm layers that are training, track running statistics with a
    ``momentum`` and have a counter do not advance ``num_batches_tracked`` themselves; when it ends (an error
    included), each counter is advanced by the number of times its layer ran, in one ``_foreach_add_`` per distinct
    count. Layers with ``momentum=None`` (a cumulative average reads the counter) keep their own updates."""
    norms = [m for m in module.modules()
             if isinstance(m, _BatchNorm) and m.training and m.track_running_stats and m.momentum is not None
             and isinstance(m._buffers.get("num_batches_tracked"), torch.Tensor)]
    if not norms:
        yield
        return
    calls = dict.fromkeys(map(id, norms), 0)

    def count(layer: nn.Module, args) -> None:
        calls[id(layer)] += 1

    counters = [m._buffers["num_batches_tracked"] for m in norms]
    handles = [m.register_forward_pre_hook(count) for m in norms]
    for m in norms:
        m._buffers["num_batches_tracked"] = None  # read by the layer's forward: no counter, no update
    try:
        yield
    finally:
        for m, counter, handle in zip(norms, counters, handles):
            m._buffers["num_batches_tracked"] = counter
            handle.remove()
        by_count: dict[int, list[torch.Tensor]] = {}
        for m, counter in zip(norms, counters):
            if calls[id(m)]:
                by_count.setdefault(calls[id(m)], []).append(counter)
        for n, tensors in by_count.items():
            torch._foreach_add_(tensors, n)
