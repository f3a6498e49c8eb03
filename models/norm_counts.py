"""BatchNorm's batch counters advanced in one operation per training step, instead of one per layer.

In training, every BatchNorm layer adds 1 to its ``num_batches_tracked`` buffer when it runs: one tiny kernel per
layer and step (108 of the 2,241 operations of an EfficientDet-D0 training step in bf16, 171 layers at D3). The
count enters the arithmetic only for a layer without ``momentum`` (a cumulative average); with a momentum it is
bookkeeping. While :func:`deferred_counts` is active, each such layer's counter is replaced by a host-side stand-in
that counts the layer's calls in Python; afterwards the counters are put back and advanced by those counts in one
multi-tensor operation (one per distinct count), so every counter ends where the layers would have left it, and
running means and variances are computed exactly as before.

The stand-in passes everything but ``add_`` on to the real counter, so code that reads the buffers while the
forward pass runs (``state_dict()`` from a forward hook, or from a checkpoint written by a signal handler) sees the
counter as it was before this step.

Only layers whose ``forward`` is known to treat the counter this way take part: PyTorch's ``BatchNorm1d/2d/3d``
(not ``SyncBatchNorm``, whose forward is another) and timm's ``BatchNormAct2d``, in training mode, tracking running
statistics, with a momentum, in a model that is not compiled, wholly or in part (the compiler would see the
stand-in). Any other layer counts for itself, as usual.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
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


_FOUND: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()


def counted_norms(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose counters :func:`deferred_counts` can advance; none in a model that is compiled,
    wholly or in part. Found on the first call for a model and kept with it (a walk over the modules, about 1 ms at
    D3, is too slow for every step): a layer added to the model later counts for itself."""
    found = _FOUND.get(model)
    if found is None:
        modules = list(model.modules())
        compiled = any(getattr(m, "_compiled_call_impl", None) is not None or hasattr(m, "_orig_mod")
                       for m in modules)
        known = _known_forwards()
        found = [] if compiled else [m for m in modules
                                     if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward in known]
        _FOUND[model] = found
    return found


class _CallCount:
    """Stands in for a layer's ``num_batches_tracked`` during a forward pass: ``add_(1)`` counts on the host; every
    other attribute is the real counter's."""

    __slots__ = ("calls", "counter")

    def __init__(self, counter: torch.Tensor) -> None:
        self.calls = 0
        self.counter = counter

    def add_(self, value) -> _CallCount:
        self.calls += int(value)
        return self

    def __getattr__(self, name: str):
        return getattr(self.counter, name)


@contextlib.contextmanager
def deferred_counts(norms: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, the layers of ``norms`` (from :func:`counted_norms`) that are training with a momentum and a
    counter count their calls on the host; on leaving it (also after an error) each counter is put back and
    advanced by its layer's calls, in one multi-tensor operation per distinct number of calls."""
    swapped = []
    try:
        for m in norms:
            counter = m._buffers.get("num_batches_tracked")
            if m.training and m.track_running_stats and m.momentum is not None and isinstance(counter, torch.Tensor):
                stand_in = _CallCount(counter)
                m._buffers["num_batches_tracked"] = stand_in
                swapped.append((m, counter, stand_in))
        yield
    finally:
        by_calls: dict[tuple[int, torch.device], list[torch.Tensor]] = defaultdict(list)
        for m, counter, stand_in in swapped:
            m._buffers["num_batches_tracked"] = counter
            if stand_in.calls:
                by_calls[stand_in.calls, counter.device].append(counter)
        for (calls, _), counters in by_calls.items():
            torch._foreach_add_(counters, calls)
