"""Counting the tensor operations a call dispatches, and which of them make the host wait for the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "OpCounter", "count_ops"]


@dataclass(frozen=True)
class OpCount:
    operations: int  #: tensor operations dispatched (views and allocations not counted)
    host_syncs: int  #: of which wait for the device (``.item()``, ``nonzero``, boolean indexing, ``equal``)
    #: view operations dispatched: they launch nothing on the device, but each costs host time (dispatch, and in
    #: training an autograd node), so a change that trades kernels for views can make a host-bound step slower
    views: int = 0


#: Operations that only allocate or describe memory (no kernel runs).
_NOT_KERNELS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
                "is_same_size", "set_", "resize_", "_unsafe_view"}
#: Operations whose result the host must wait for.
_HOST_SYNCS = {"_local_scalar_dense", "nonzero", "nonzero_numpy", "equal", "masked_select", "_unique", "_unique2",
               "unique_dim", "unique_consecutive", "is_nonzero", "bincount"}
#: Indexing operations that synchronise when an index is a boolean mask (it is turned into positions first).
_MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether operation ``name`` on ``args`` makes the host wait for the device."""
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
    if (first is not None and first.device.type == "cpu" and not on_device and torch.cuda.is_initialized()
            and not first.is_pinned()):
        # A process that uses CUDA keeps this value on the host: reading it waits for nothing. (Without CUDA every
        # tensor is on the host, and the count says what would wait on a GPU. Pinned memory is where a non-blocking
        # copy from the device lands: reading it waits for that copy.)
        return False
    if name in _HOST_SYNCS:
        return True
    if name in _MASK_INDEXING and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if name == "repeat_interleave":  # the output size is read from the device unless given
        return kwargs.get("output_size") is None
    if first is None:
        return False
    if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):  # device -> host memory
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        pinned = non_blocking and first.device.type == "cpu" and first.is_pinned()  # lands later; nothing waits
        return first.device.type == "cpu" and args[1].device.type != "cpu" and not pinned
    if first.device.type == "cpu":
        return False
    if name == "nms":  # torchvision's GPU NMS finishes its greedy pass on the host
        return True
    if name == "_to_copy":  # device -> host copy
        return torch.device(kwargs.get("device") or first.device).type == "cpu"
    return False


class OpCounter(TorchDispatchMode):
    """A dispatch mode that counts tensor operations (``.operations``), host synchronisations (``.syncs``) and view
    operations (``.views``)."""

    def __init__(self) -> None:
        super().__init__()
        self.operations = self.syncs = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.is_view:
            self.views += 1
        elif name not in _NOT_KERNELS:
            self.operations += 1
            self.syncs += _is_sync(name, args, kwargs or {})
        return func(*args, **(kwargs or {}))

    def result(self) -> OpCount:
        """The counts so far."""
        return OpCount(self.operations, self.syncs, self.views)


def count_ops(fn: Callable[[], Any]) -> OpCount:
    """Runs ``fn`` once (after one uncounted call) and counts the tensor operations it dispatches."""
    fn()
    with OpCounter() as counter:
        fn()
    return counter.result()
