"""BatchNorm counters advanced in one operation per step (models.norm_counts): the same counts and statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from models.detector import efficientdet
from models.norm_counts import counted_norms, deferred_counts
from tasks.base import training_forward
from tasks.benchmark import count_ops


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def test_a_detector_trains_to_the_same_counts_statistics_and_outputs_with_fewer_operations():
    torch.manual_seed(0)
    plain = efficientdet("d0", num_classes=5).train()
    deferred = copy.deepcopy(plain)
    norms = counted_norms(deferred)
    assert len(norms) == 108  # every BatchNorm of D0 (timm's BatchNormAct2d and torch's BatchNorm2d)
    x = torch.randn(2, 3, 128, 128)
    for step in range(2):
        torch.manual_seed(step)  # the same drop-path masks for both
        ref = plain(x)
        torch.manual_seed(step)
        out = training_forward(deferred, x, fused_weight_casts=False)
        for a, b in zip(ref, out, strict=True):
            for level in a:
                assert torch.equal(a[level], b[level])
    want, got = _buffers(plain), _buffers(deferred)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
        if key.endswith("num_batches_tracked"):
            assert got[key].item() == 2
    assert all(isinstance(m.num_batches_tracked, torch.Tensor) for m in norms)  # put back after each step
    with torch.no_grad():
        ops_plain = count_ops(lambda: plain(x)).operations
        ops_deferred = count_ops(lambda: training_forward(deferred, x, fused_weight_casts=False)).operations
    assert ops_plain - ops_deferred == len(norms) - 1  # one add_ per layer -> one multi-tensor add


class _Odd(nn.Module):
    """A layer called twice, one not called, one with a cumulative average (no momentum), a SyncBatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.BatchNorm2d(3)
        self.unused = nn.BatchNorm2d(3)
        self.cumulative = nn.BatchNorm2d(3, momentum=None)
        self.act = BatchNormAct2d(3)
        self.sync = nn.SyncBatchNorm(3)

    def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
        x = self.act(self.cumulative(self.twice(self.twice(x))))
        if fail:
            raise RuntimeError("stop")
        return x


def test_layers_called_twice_or_not_at_all_and_cumulative_averages():
    torch.manual_seed(1)
    plain = _Odd().train()
    deferred = copy.deepcopy(plain)
    norms = counted_norms(deferred)
    assert deferred.sync not in norms and deferred.act in norms  # SyncBatchNorm requires a tensor counter
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        ref = plain(x)
        with deferred_counts(norms):
            out = deferred(x)
        assert torch.equal(ref, out)
    want, got = _buffers(plain), _buffers(deferred)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert got["twice.num_batches_tracked"].item() == 6 and got["unused.num_batches_tracked"].item() == 0
    assert got["cumulative.num_batches_tracked"].item() == 3  # counted by the layer itself, as it needs the count
    # In evaluation mode nothing is counted, and nothing is swapped.
    deferred.eval()
    with deferred_counts(norms):
        deferred(x)
    assert _buffers(deferred)["twice.num_batches_tracked"].item() == 6


def test_an_error_in_the_forward_pass_puts_the_counters_back_advanced_by_the_calls_made():
    model = _Odd().train()
    norms = counted_norms(model)
    with pytest.raises(RuntimeError, match="stop"), deferred_counts(norms):
        model(torch.randn(4, 3, 8, 8), fail=True)
    assert all(isinstance(m.num_batches_tracked, torch.Tensor) for m in norms)
    assert model.twice.num_batches_tracked.item() == 2 and model.act.num_batches_tracked.item() == 1
    assert "num_batches_tracked" in dict(model.twice.named_buffers())  # still a buffer: saved in checkpoints


def test_buffers_read_during_the_forward_pass_are_the_real_counters():
    """A forward hook (or a checkpoint written by a signal handler mid-step) reading the state dict sees tensors:
    each counter as it was before this step."""
    model = _Odd().train()
    norms = counted_norms(model)
    seen = []
    model.act.register_forward_hook(lambda *_: seen.append({k: v.clone() for k, v in model.state_dict().items()}))
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        with deferred_counts(norms):
            model(x)
    assert [s["twice.num_batches_tracked"].item() for s in seen] == [0, 2]
    assert model.twice.num_batches_tracked.item() == 4 and copy.deepcopy(model).twice.num_batches_tracked.item() == 4


def test_lazy_layers_and_compiled_models():
    torch.manual_seed(2)
    plain = nn.Sequential(nn.LazyBatchNorm2d(), nn.BatchNorm2d(3)).train()
    deferred = nn.Sequential(nn.LazyBatchNorm2d(), nn.BatchNorm2d(3)).train()  # (a lazy layer cannot be copied)
    x = torch.randn(4, 3, 8, 8)
    ref = plain(x)
    with deferred_counts(counted_norms(deferred)):
        out = deferred(x)
    assert torch.equal(ref, out)
    for key, value in _buffers(plain).items():
        assert torch.equal(value, _buffers(deferred)[key]), key
    part = _Odd()
    part.twice.compile()  # compiled on its own: the compiler must not meet a stand-in
    assert counted_norms(part) == [] and len(counted_norms(_Odd())) == 4


def test_the_task_training_step_advances_every_counter_in_one_operation():
    from torch.utils._python_dispatch import TorchDispatchMode

    from tasks.config import compose
    from tasks.runner import build_model, build_task

    cfg = compose("train", ["task=detection", "data=synthetic", "model.image_size=128", "neck.channels=16",
                            "neck.num_repeats=1", "head.depth=1"])
    task = build_task(cfg, build_model(cfg)).train()
    norms = counted_norms(task.model)
    assert norms and counted_norms(task.model) is norms  # found once per model

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    seen: list[str] = []
    with Names():
        task.run_model(torch.randn(2, 3, 128, 128))
    assert "add_" not in seen and seen.count("_foreach_add_") == 1
    assert all(m.num_batches_tracked.item() == 1 for m in norms)
    twin = copy.deepcopy(task)  # a copy's model has layers of its own, found anew
    assert counted_norms(twin.model)[0] is not norms[0] and len(counted_norms(twin.model)) == len(norms)
