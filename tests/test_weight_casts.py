"""One low-precision copy of the weights per step (models.weight_casts) gives autocast's values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.weight_casts import low_precision_weights
from tasks.benchmark import count_ops
from tasks.config import compose
from tasks.runner import build_model, build_task

SMALL = ["image_size=128", "model.image_size=128", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
         "backbone.drop_path_rate=0.0"]


def _task():
    torch.manual_seed(0)
    cfg = compose("benchmark", SMALL)
    return build_task(cfg, build_model(cfg)).train()


def _step(model, x, fused: bool, cache: bool = True):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
        if fused:
            with low_precision_weights(model, torch.bfloat16):
                out = model(x)
        else:
            out = model(x)
        loss = sum(v.float().square().mean() for v in [*out.cls_logits.values(), *out.box_deltas.values()])
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cache", [True, False])  # autocast's weight-cast cache: PyTorch's default, Lightning's
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_outputs_and_gradients_as_autocast(channels_last, cache):
    model = _task().model
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    plain, fused = copy.deepcopy(model), copy.deepcopy(model)
    out_a, grads_a = _step(plain, x, fused=False, cache=cache)
    out_b, grads_b = _step(fused, x, fused=True, cache=cache)
    for level in out_a.cls_logits:
        assert torch.equal(out_a.cls_logits[level], out_b.cls_logits[level])
        assert torch.equal(out_a.box_deltas[level], out_b.box_deltas[level])
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name
        assert grads_b[name].dtype == torch.float32
        assert grads_b[name].stride() == dict(fused.named_parameters())[name].stride() or grads_b[name].numel() == 1
    # The layers have their float32 parameters back.
    assert all(isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32 for p in fused.parameters())


def test_without_the_cache_the_head_keeps_per_use_casts(monkeypatch):
    """Without autocast's cache each use of a head layer (one per level) casts anew, and its gradients are summed in
    float32: one shared copy would sum them in bf16, which is what the head's reuses_layers marker prevents."""
    from heads.efficientdet import HeadNet

    model = _task().model
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    _, plain = _step(copy.deepcopy(model), x, fused=False, cache=False)
    monkeypatch.setattr(HeadNet, "reuses_layers", False)
    _, shared = _step(copy.deepcopy(model), x, fused=True, cache=False)
    differ = {n for n, g in plain.items() if not torch.equal(g, shared[n])}
    assert differ and all(n.startswith("head.") for n in differ)


def test_fewer_operations_per_step_and_parameters_back_after_an_error():
    model = _task().model
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    plain = count_ops(lambda: _step(model, x, fused=False)).operations
    fused = count_ops(lambda: _step(model, x, fused=True)).operations
    assert plain - fused > convs  # a cast forward and one backward per convolution weight, against a handful
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), low_precision_weights(model, torch.bfloat16):
        assert next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight.dtype == torch.bfloat16
        raise RuntimeError("boom")
    assert all(p is before[n] for n, p in model.named_parameters())


def test_task_uses_it_in_mixed_precision_training_only(monkeypatch):
    import tasks.base

    task = _task()
    assert task.fused_weight_casts is False  # off by default: on an H100 it saved no GPU time and cost host time
    task.fused_weight_casts = True
    calls = []
    real = tasks.base.low_precision_weights
    monkeypatch.setattr(tasks.base, "low_precision_weights", lambda m, d: calls.append(d) or real(m, d))
    x = torch.randn(2, 3, 128, 128)
    task(x)  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        task(x)
        task.eval()
        task(x)  # evaluation
        task.train()
        task.fused_weight_casts = False
        task(x)
    assert calls == [torch.bfloat16]


class _StandardisedConv(torch.nn.Conv2d):
    """A convolution that transforms its weight in forward (as weight standardisation does)."""

    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_only_stock_layers_are_swapped_and_nesting_and_tying_are_safe():
    from models.weight_casts import _castable

    plain, custom, frozen = torch.nn.Conv2d(3, 4, 3), _StandardisedConv(4, 4, 3), torch.nn.Conv2d(4, 4, 1)
    frozen.requires_grad_(False)
    tied, tied2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    tied2.weight = tied.weight  # one parameter in two layers
    net = torch.nn.Sequential(plain, custom, frozen, tied, tied2)
    net.add_module("again", tied)  # the same layer twice
    swapped = {(id(layer), name) for layer, name, _ in _castable(net, per_use=False)}
    assert swapped == {(id(plain), "weight"), (id(plain), "bias"), (id(tied), "weight"), (id(tied), "bias"),
                       (id(tied2), "weight"), (id(tied2), "bias")}
    # Without autocast's cache each use of a tied parameter casts anew: it keeps those casts.
    per_use = {(id(layer), name) for layer, name, _ in _castable(net, per_use=True)}
    assert per_use == swapped - {(id(tied), "weight"), (id(tied2), "weight")}
    frozen.weight.requires_grad_(True)  # found anew at every call
    assert (id(frozen), "weight") in {(id(layer), name) for layer, name, _ in _castable(net, per_use=False)}
    with low_precision_weights(net, torch.bfloat16):
        assert plain.weight.dtype == torch.bfloat16 and custom.weight.dtype == torch.float32
        assert tied.weight is tied2.weight and tied.weight.dtype == torch.bfloat16  # one copy for the tied weight
        with low_precision_weights(net, torch.bfloat16):  # nested: nothing more is swapped, nothing lost
            assert plain.weight.dtype == torch.bfloat16
        assert plain.weight.dtype == torch.bfloat16
    assert all(isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32 for p in net.parameters())


def test_every_copy_starts_on_a_128_byte_boundary():
    """cuDNN picks convolution kernels by the weight's address alignment: an unaligned copy would get slower
    generic kernels than autocast's own (freshly allocated) casts. Odd-sized biases sit between the weights."""
    from models.weight_casts import ALIGN_ELEMENTS

    net = nn.Sequential(nn.Conv2d(3, 5, 3, bias=True), nn.Conv2d(5, 7, 1, bias=True), nn.Conv2d(7, 4, 3, groups=1),
                        nn.Conv2d(4, 4, 3, groups=4, bias=True)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 12, 12).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), low_precision_weights(net, torch.bfloat16):
        seen = [(m.weight, m.bias) for m in net]  # the copies the layers read inside the block
        out = net(x)
    base = seen[0][0].untyped_storage().data_ptr()  # one buffer (CUDA's allocator aligns it to 512 bytes)
    for weight, bias in seen:
        for t in (weight, bias):
            if t is not None:
                assert t.dtype == torch.bfloat16 and t.untyped_storage().data_ptr() == base
                assert (t.data_ptr() - base) % 128 == 0
    assert ALIGN_ELEMENTS * 2 == 128
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = net(x)
    assert torch.equal(out, ref)


class _MixedDtypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.c32 = nn.Conv2d(3, 4, 3, padding=1)
        self.c64 = nn.Conv2d(3, 4, 3, padding=1).double()
        self.c16 = nn.Conv2d(3, 4, 1).half()

    def forward(self, x):
        return self.c32(x) + self.c64(x.double()).float() + self.c16.weight.float().sum()


def test_only_float32_parameters_are_copied():
    """Autocast casts float32 weights only; a float64 (or float16) layer runs as autocast leaves it."""
    from models.weight_casts import _castable

    torch.manual_seed(0)
    net = _MixedDtypes()
    assert {id(p) for _, _, p in _castable(net, per_use=False)} == {id(net.c32.weight), id(net.c32.bias)}
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = net(x)
        with low_precision_weights(net, torch.bfloat16):
            out = net(x)
    assert torch.equal(out, ref)
