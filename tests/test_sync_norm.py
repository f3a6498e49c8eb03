"""trainer.sync_batchnorm keeps timm's fused norm + activation layers whole (tasks.callbacks.SyncNormLayers)."""

from __future__ import annotations

import copy

import lightning as L
import torch
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from tasks.callbacks import SyncNormLayers
from tasks.config import compose
from tasks.runner import build_model

SMALL = ["image_size=64", "model.image_size=64", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
         "backbone.drop_path_rate=0.0"]


def _outputs(model, x):
    out = model(x)
    return torch.cat([v.flatten() for v in [*out.cls_logits.values(), *out.box_deltas.values()]])


def test_synced_model_computes_the_same_network_and_reverts_to_its_own_layers():
    torch.manual_seed(0)
    model = build_model(compose("benchmark", SMALL)).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = _outputs(model, x)
    fused = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert fused > 10
    # What Lightning's own conversion does: plain SyncBatchNorm layers, without timm's activations.
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert not torch.allclose(_outputs(plain, x), expected)

    plugin = SyncNormLayers()
    synced = plugin.apply(model)  # without a process group a SyncBatchNorm computes as a BatchNorm
    assert sum(isinstance(m, SyncBatchNormAct) for m in synced.modules()) == fused
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == norms
    torch.testing.assert_close(_outputs(synced, x), expected, rtol=0, atol=0)
    synced.train()
    _outputs(synced, x).square().mean().backward()  # a training step updates the synced layers' statistics
    stats = {n: b.clone() for n, b in synced.named_buffers()}
    reverted = plugin.revert(synced)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in reverted.modules())
    assert sum(isinstance(m, BatchNormAct2d) for m in reverted.modules()) == fused
    assert all(torch.equal(b, stats[n]) for n, b in reverted.named_buffers()) and len(stats) > 20
    assert all(p.grad is not None for p in reverted.parameters() if p.requires_grad)


def test_the_trainer_takes_it_for_sync_batchnorm():
    plugin = SyncNormLayers()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=True, plugins=[plugin],
                        logger=False, enable_checkpointing=False)
    assert trainer.strategy._layer_sync is plugin
