"""Precise BatchNorm: the running statistics of the weights being evaluated, recomputed over training batches.

BatchNorm's running statistics are an exponential average of the batches seen in training, with the paper's
momentum (0.01) mostly their initial values after a few hundred steps, so a short run or fine-tune would be evaluated
with statistics of another network. Before each evaluation the statistics are recomputed as the population mean and
variance of each layer's input over a fixed set of training batches (the other layers in evaluation mode, each
BatchNorm normalising with its batch's statistics, as in training), summed over all processes under DDP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import nn

from utils.distributed import all_reduce_sum, is_distributed

__all__ = ["PreciseBN", "load_norm_statistics", "norm_layers", "recompute_norm_statistics"]

log = logging.getLogger(__name__)

#: A layer's recomputed ``(running_mean, running_var)``, by module name.
NormStatistics = dict[str, tuple[torch.Tensor, torch.Tensor]]


def norm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics, by module name."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


@torch.no_grad()
def recompute_norm_statistics(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> NormStatistics:
    """Set the running statistics of every BatchNorm layer of ``model`` to the mean and (unbiased) variance of its
    input over ``batches`` (normalised images), and return them.

    The model runs with only its BatchNorm layers in training mode (no dropout or stochastic depth), so each layer
    sees the input it saw in training. ``all_reduce`` (an in-place sum over processes) makes every process compute
    the statistics of all processes' batches; each must then run the same number of batches. Each layer's
    ``num_batches_tracked`` and the modules' training flags are left as they were; a layer that no batch reached,
    and one that stays in evaluation mode when the model trains (a frozen backbone stage), keeps its statistics.
    """
    modes = {m: m.training for m in model.modules()}
    sums: dict[str, torch.Tensor] = {}  # per layer: [count, sum, sum of squares] per channel, in float64

    def accumulate(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            dims = [d for d in range(x.ndim) if d != 1]
            moments = torch.stack([  # sums in float64, with no float64 copy of the map
                torch.full((x.shape[1],), x.numel() / x.shape[1], dtype=torch.float64, device=x.device),
                x.sum(dims, dtype=torch.float64), x.square().sum(dims, dtype=torch.float64),
            ])
            sums[name] = sums[name] + moments if name in sums else moments
        return hook

    handles = []
    try:
        model.train()  # the layers that train: a frozen stage keeps its BatchNorm in evaluation mode
        norms = {name: m for name, m in norm_layers(model).items() if m.training}
        counters = {name: m.num_batches_tracked.clone() for name, m in norms.items()
                    if m.num_batches_tracked is not None}
        handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in norms.items()]
        model.eval()
        for m in norms.values():
            m.train()
        for images in batches if norms else ():
            # forward, not __call__: a model compiled in place runs eagerly here, with the hooks.
            model.forward(images)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if not norms:
        return {}
    names = list(norms)
    channels = [norms[n].num_features for n in names]
    device = next(iter(norms.values())).running_mean.device
    packed = torch.cat([
        sums[n].to(device) if n in sums else torch.zeros(3, c, dtype=torch.float64, device=device)
        for n, c in zip(names, channels)
    ], dim=1)
    if all_reduce is not None:
        packed = all_reduce(packed)
    stats: NormStatistics = {}
    for name, chunk in zip(names, packed.split(channels, dim=1)):
        m = norms[name]
        if name in counters:
            m.num_batches_tracked.copy_(counters[name])
        count, total, total_sq = chunk
        n = float(count[0])
        if n < 2:
            continue
        mean = total / n
        var = (total_sq - total * mean).clamp_min(0) / (n - 1)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        stats[name] = (m.running_mean.detach().clone(), m.running_var.detach().clone())
    return stats


def load_norm_statistics(model: nn.Module, stats: NormStatistics) -> None:
    """Copy recomputed statistics (of :func:`recompute_norm_statistics`) into ``model``'s layers of those names."""
    norms = norm_layers(model)
    with torch.no_grad():
        for name, (mean, var) in stats.items():
            norms[name].running_mean.copy_(mean)
            norms[name].running_var.copy_(var)


def check_settings(*, num_batches: Any, transform: Any) -> None:
    """A ``ValueError`` naming the setting (``task.module.precise_bn.*``) when a value cannot work."""
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"task.module.precise_bn.num_batches must be a positive integer, got {num_batches!r}")
    if transform not in ("train", "eval"):
        raise ValueError(f"task.module.precise_bn.transform must be 'train' or 'eval', got {transform!r}")


class PreciseBN(L.Callback):
    """Recomputes the BatchNorm statistics of the evaluated weights before every validation (not the sanity check).

    Put it after the EMA callback: that one swaps the averaged weights into the module when validation starts, so
    the statistics are those of the averaged weights, and they stay with the average when it swaps back (checkpoints
    written after validation hold them). When training ends they are made for the final weights. The batches come from the data module's
    ``norm_statistics_dataloader(num_batches, transform=...)``: the same training images each time, with a fixed
    augmentation. The statistics of the last recompute are kept (:attr:`statistics`, :attr:`step`), so a second
    validation at the same step (the final evaluation) reuses them.
    """

    def __init__(self, *, num_batches: int = 50, transform: str = "train") -> None:
        check_settings(num_batches=num_batches, transform=transform)
        self.num_batches = num_batches
        self.transform = transform
        #: The statistics of the last recompute, and the global step it was made at.
        self.statistics: NormStatistics | None = None
        self.step: int | None = None
        #: Seconds the last recompute took.
        self.seconds = 0.0

    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> NormStatistics:
        """Give ``pl_module.model`` the statistics of its weights at this step: recomputed, or those of an earlier
        recompute at the same step."""
        if self.statistics is not None and self.step == trainer.global_step:
            load_norm_statistics(pl_module.model, self.statistics)
            return self.statistics
        start = time.perf_counter()
        loader = trainer.datamodule.norm_statistics_dataloader(self.num_batches, transform=self.transform)
        device = pl_module.device
        batches = (pl_module.normalize(b["images"].to(device, non_blocking=True)) for b in loader)
        with trainer.precision_plugin.forward_context():
            self.statistics = recompute_norm_statistics(
                pl_module.model, batches, all_reduce=all_reduce_sum if is_distributed() else None
            )
        self.step = trainer.global_step
        self.seconds = time.perf_counter() - start
        if trainer.is_global_zero:
            log.info("BatchNorm statistics recomputed over %d training batches (%s transform) in %.1f s",
                     len(loader), self.transform, self.seconds)
        return self.statistics

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.refresh(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The final weights (the EMA callback, listed before, has copied the average in), while the module is still
        # on its device: the statistics the final checkpoint is given (see tasks.runner).
        if not trainer.fast_dev_run:
            self.refresh(trainer, pl_module)
