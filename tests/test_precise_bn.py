"""Precise BatchNorm: recomputed statistics are the population statistics of each layer's input, the same over two
gloo processes as in one, and a short run's reported AP is that of its checkpoint with such statistics."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from gloo_processes import run_on_two_processes
from torch import nn

from tasks.config import compose
from tasks.precise_bn import norm_layers, recompute_norm_statistics
from tasks.runner import evaluate, train

TINY_DET = [
    "data=synthetic", "model.image_size=128", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
    "data.batch_size=4", "data.num_workers=0", "data.synthetic.num_train=16", "data.synthetic.num_val=7",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=0.01), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5, momentum=0.01), nn.ReLU(),
    )


def _batches(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 3, 8, 8, generator=g) * 2 + 0.5 for _ in range(n)]


def _population(net: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm's input over all batches, computed layer by layer: every batch normalised with its own
    statistics (as in training), dropout off; then the mean and unbiased variance over every pixel of every batch."""
    conv1, bn1, conv2 = net[0], net[1], net[4]
    in1 = [conv1(b) for b in batches]
    in2 = []
    for x in in1:
        mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
        y = (x - mean) / torch.sqrt(var + bn1.eps) * bn1.weight.view(1, -1, 1, 1) + bn1.bias.view(1, -1, 1, 1)
        in2.append(conv2(torch.relu(y)))
    out = []
    for inputs in (in1, in2):
        flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in inputs], dim=1).double()
        out.append((flat.mean(1), flat.var(1, unbiased=True)))
    return out


@torch.no_grad()
def test_recomputed_statistics_are_the_population_statistics():
    net = _net()
    net.train()
    for m in net.modules():  # an eval-mode module stays so, a train-mode one too
        if isinstance(m, nn.ReLU):
            m.eval()
    modes = {m: m.training for m in net.modules()}
    counters = [m.num_batches_tracked.clone() for m in norm_layers(net).values()]
    batches = _batches()
    expected = _population(net, batches)
    stats = recompute_norm_statistics(net, batches)
    assert list(stats) == ["1", "5"]
    for (mean, var), bn, (stat_mean, stat_var) in zip(expected, (net[1], net[5]), stats.values()):
        assert torch.allclose(bn.running_mean.double(), mean, atol=1e-5, rtol=0)
        assert torch.allclose(bn.running_var.double(), var, atol=1e-5, rtol=1e-5)
        assert torch.equal(stat_mean, bn.running_mean) and torch.equal(stat_var, bn.running_var)
    # Far from what a momentum of 0.01 would have given (the comparison can fail).
    assert not torch.allclose(net[5].running_var, torch.ones(5), atol=0.1)
    assert {m: m.training for m in net.modules()} == modes
    assert [m.num_batches_tracked for m in norm_layers(net).values()] == counters


@torch.no_grad()
def test_a_layer_no_batch_reaches_keeps_its_statistics():
    net = nn.ModuleDict({"used": nn.BatchNorm2d(3), "unused": nn.BatchNorm2d(3)})
    net.forward = lambda x: net["used"](x)
    net["unused"].running_mean.fill_(7.0)
    stats = recompute_norm_statistics(net, _batches(2))
    assert list(stats) == ["used"]
    assert torch.equal(net["unused"].running_mean, torch.full((3,), 7.0))


def _statistics_on(rank: int) -> dict:
    from utils.distributed import all_reduce_sum

    stats = recompute_norm_statistics(_net(), _batches()[rank::2], all_reduce=all_reduce_sum)
    return {k: (m.tolist(), v.tolist()) for k, (m, v) in stats.items()}


def test_two_gloo_processes_give_the_statistics_of_one_over_the_same_images():
    results = run_on_two_processes(_statistics_on)
    single = recompute_norm_statistics(_net(), _batches())
    for stats in results:
        assert list(stats) == list(single)
        for name, (mean, var) in stats.items():
            assert torch.allclose(torch.tensor(mean), single[name][0], atol=1e-6, rtol=0)
            assert torch.allclose(torch.tensor(var), single[name][1], atol=1e-6, rtol=1e-6)


def _evaluate(tmp_path, ckpt) -> dict:
    overrides = [f"ckpt={ckpt}"]
    return evaluate(compose("eval", [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", *overrides]),
                    tmp_path / f"eval_{ckpt.stem}", overrides=overrides)


@pytest.mark.slow
def test_a_short_runs_reported_ap_is_its_checkpoints_with_recomputed_statistics(tmp_path, caplog):
    """A 12-step run with the paper's BatchNorm momentum: its metrics.json equals evaluating its last.ckpt after the
    test recomputes that checkpoint's statistics itself (one batch of the same 16 images, each BatchNorm's running
    statistics a cumulative average, i.e. that batch's), and differs from the stale statistics' AP. The warmup of 1000
    steps is shortened to a fifth of the run, with a line saying so."""
    from tasks.runner import build_task

    base = [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=12", "trainer.max_epochs=-1",
            "trainer.check_val_every_n_epoch=100", "task.module.warmup_steps=1000", "optim=adamw",
            "task.module.optimizer.lr=0.01", "data.batch_size=16", "task.module.precise_bn.num_batches=1",
            "ema.decay=0.9"]
    with caplog.at_level(logging.INFO):
        train(compose("train", base), tmp_path / "run")
    assert "warmup shortened from 1000 to 2 steps" in caplog.text
    assert "BatchNorm statistics recomputed over 1 training batches" in caplog.text
    reported = json.loads((tmp_path / "run" / "metrics.json").read_text())
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["effdense_norm_statistics"]["step"] == ckpt["global_step"] == 12

    cfg = compose("train", base)
    task = build_task(cfg)
    task.load_state_dict(ckpt["state_dict"])
    model = task.model
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup("fit")
    loader = dm.norm_statistics_dataloader(1)
    (batch,) = list(loader)
    assert batch["images"].shape[0] == 16  # the whole split, one batch
    model.eval()
    for m in norm_layers(model).values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        model(task.normalize(batch["images"]))
    recomputed = {f"model.{k}": v for k, v in model.state_dict().items()}
    for key, value in ckpt["state_dict"].items():
        if key.endswith(("running_mean", "running_var")):
            assert torch.allclose(value, recomputed[key], atol=1e-4, rtol=1e-4), key
    own = dict(ckpt, state_dict={k: recomputed.get(k, v) for k, v in ckpt["state_dict"].items()})
    torch.save(own, tmp_path / "own.ckpt")
    metrics = _evaluate(tmp_path, tmp_path / "own.ckpt")
    assert metrics["AP"] == pytest.approx(reported["AP"], abs=1e-6)
    assert metrics["AP50"] == pytest.approx(reported["AP50"], abs=1e-6)
    # The EMA's running statistics (no recompute) give another AP: the comparison can fail.
    stale = dict(ckpt, state_dict={k: ckpt["current_model_state"][k] if k.endswith(("running_mean", "running_var"))
                                   else v for k, v in ckpt["state_dict"].items()})
    torch.save(stale, tmp_path / "stale.ckpt")
    stale_metrics = _evaluate(tmp_path, tmp_path / "stale.ckpt")
    assert stale_metrics["AP"] != pytest.approx(reported["AP"], abs=1e-3)
