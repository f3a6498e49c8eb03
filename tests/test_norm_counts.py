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
        out = training_forward(deferred, x, fused_weight_casts=False, norms=norms)
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
        ops_deferred = count_ops(lambda: training_forward(deferred, x, fused_weight_casts=False, norms=norms)).operations
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
