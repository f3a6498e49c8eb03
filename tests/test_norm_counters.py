"""BatchNorm batch counters advanced in one operation per step (models.norm_counters): the same buffers, values and
gradients as the layers' own updates, fewer operations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.norm_counters import batched_norm_counters
from tasks.benchmark import count_ops


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.twice = nn.BatchNorm2d(4)  # runs twice per forward
        self.once = nn.BatchNorm2d(4)
        self.cumulative = nn.BatchNorm2d(4, momentum=None)  # reads its counter: keeps its own update
        self.frozen = nn.BatchNorm2d(4)  # eval mode inside a training model
        self.unused = nn.BatchNorm2d(4)  # never runs

    def forward(self, x, fail: bool = False):
        x = self.twice(self.conv(x))
        x = self.once(torch.relu(x))
        if fail:
            raise RuntimeError("boom")
        x = self.twice(x)
        return self.frozen(self.cumulative(x))


def _run(net, x, batched: bool):
    net.zero_grad(set_to_none=True)
    if batched:
        with batched_norm_counters(net):
            out = net(x)
    else:
        out = net(x)
    out.square().mean().backward()
    return out, {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


def test_same_buffers_values_and_gradients_as_the_layers_own_updates():
    torch.manual_seed(0)
    net = _Net().train()
    net.frozen.eval()
    x = torch.randn(2, 3, 8, 8)
    plain, batched = copy.deepcopy(net), copy.deepcopy(net)
    for _ in range(3):
        out_a, grads_a = _run(plain, x, batched=False)
        out_b, grads_b = _run(batched, x, batched=True)
        assert torch.equal(out_a, out_b)
        assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    buffers_a, buffers_b = dict(plain.named_buffers()), dict(batched.named_buffers())
    assert buffers_a.keys() == buffers_b.keys()
    for name, value in buffers_a.items():
        assert torch.equal(value, buffers_b[name]), name
    counts = {n.split(".")[0]: int(v) for n, v in buffers_b.items() if n.endswith("num_batches_tracked")}
    assert counts == {"twice": 6, "once": 3, "cumulative": 3, "frozen": 0, "unused": 0}
    # The counters are the module's own tensors again (nothing left swapped out).
    assert all(isinstance(m.num_batches_tracked, torch.Tensor) for m in batched.modules() if isinstance(m, nn.BatchNorm2d))


def test_one_operation_for_all_counters_and_an_error_still_counts_what_ran():
    net = nn.Sequential(*(nn.BatchNorm2d(3) for _ in range(10))).train()
    x = torch.randn(2, 3, 4, 4)
    plain = count_ops(lambda: net(x)).operations
    batched = count_ops(lambda: _batched(net, x)).operations
    assert plain - batched == 9  # ten increments -> one multi-tensor add
    failing = _Net().train()
    with pytest.raises(RuntimeError, match="boom"), batched_norm_counters(failing):
        failing(torch.randn(2, 3, 8, 8), fail=True)
    assert int(failing.twice.num_batches_tracked) == 1 and int(failing.once.num_batches_tracked) == 1
    assert not failing.twice._forward_pre_hooks  # the counting hooks are gone


def _batched(net, x):
    with batched_norm_counters(net):
        return net(x)


def test_a_detection_model_trains_the_same_with_it():
    from tasks.base import training_forward
    from tasks.config import compose
    from tasks.runner import build_model

    cfg = compose("benchmark", ["image_size=64", "model.image_size=64", "neck.channels=16", "neck.num_repeats=1",
                                "head.depth=1", "backbone.drop_path_rate=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(2, 3, 64, 64)
    plain, batched = copy.deepcopy(model), copy.deepcopy(model)
    out_a = plain(x)
    out_b = training_forward(batched, x, fused_weight_casts=True)  # float32: no autocast, so no weight casts
    for level in out_a.cls_logits:
        assert torch.equal(out_a.cls_logits[level], out_b.cls_logits[level])
    state_a, state_b = plain.state_dict(), batched.state_dict()
    assert sum(k.endswith("num_batches_tracked") for k in state_a) > 20
    assert all(torch.equal(v, state_b[k]) for k, v in state_a.items())
    fewer = count_ops(lambda: plain(x)).operations - count_ops(
        lambda: training_forward(batched, x, fused_weight_casts=False)).operations
    assert fewer == sum(k.endswith("num_batches_tracked") for k in state_a) - 1
