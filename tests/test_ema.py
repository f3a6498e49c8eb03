"""The EMA of the weights: the documented update, as a few multi-tensor operations without host synchronisation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmarks.ops import count_ops
from tasks.callbacks import _EmaModel, _match_layout, ema_weight


def _model(width: int = 8, blocks: int = 2) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width), nn.SiLU()]
    return nn.Sequential(*layers)


def _train_a_little(model: nn.Module, seed: int) -> None:
    """Change every parameter and BatchNorm buffer (as a training step would)."""
    torch.manual_seed(seed)
    model.train()
    model(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("warmup", [True, False])
def test_update_is_the_documented_formula(warmup):
    torch.manual_seed(0)
    model = _model()
    ema = _EmaModel(model, decay=0.9, warmup=warmup, device=None)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(6):
        _train_a_little(model, seed=n)
        ema.update_parameters(model)
        weight = ema_weight(0.9, warmup, n)
        for key, value in model.state_dict().items():
            if n == 0 or not value.is_floating_point():
                expected[key] = value.clone()  # first update copies; integer buffers follow the model
            else:
                expected[key] = expected[key] + (value - expected[key]) * weight
    assert int(ema.n_averaged) == 6
    for key, value in ema.module.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert ema.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 6


def test_weight_ramps_up_to_the_decay():
    assert ema_weight(0.9998, True, 0) == pytest.approx(0.9)
    assert ema_weight(0.9998, True, 10) == pytest.approx(1 - 11 / 20)
    assert ema_weight(0.9998, True, 10**6) == pytest.approx(1 - 0.9998)
    assert ema_weight(0.9998, False, 0) == pytest.approx(1 - 0.9998)


@pytest.mark.parametrize("blocks", [2, 12])
def test_update_cost_does_not_grow_with_the_number_of_tensors(blocks):
    model = _model(blocks=blocks)
    ema = _EmaModel(model, decay=0.9998, warmup=True, device=None)
    ema.update_parameters(model)
    count = count_ops(lambda: ema.update_parameters(model))
    # sub, mul, add over all floating-point tensors, one copy of the integer buffers, the count's increment
    assert count.operations <= 6
    assert count.host_syncs == 0


def test_count_is_read_again_after_loading_a_state():
    model = _model()
    ema = _EmaModel(model, decay=0.9, warmup=True, device=None)
    for n in range(3):
        _train_a_little(model, seed=n)
        ema.update_parameters(model)
    restored = _EmaModel(_model(), decay=0.9, warmup=True, device=None)
    restored.load_state_dict(ema.state_dict())
    _train_a_little(model, seed=10)
    ema.update_parameters(model)
    restored.update_parameters(model)
    for (key, a), b in zip(ema.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), key


def test_layout_follows_the_model_and_structure_is_checked():
    model = _model()
    ema = _EmaModel(model, decay=0.9, warmup=True, device=None)
    before = copy.deepcopy(ema.module.state_dict())
    model.to(memory_format=torch.channels_last)
    _match_layout(ema.module, model)
    for a, m in zip(ema.module.parameters(), model.parameters()):
        assert a.stride() == m.stride()
    for key, value in ema.module.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(RuntimeError, match="structure changed"):
        ema.update_parameters(_model(blocks=3))
