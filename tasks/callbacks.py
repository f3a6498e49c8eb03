"""Training callbacks."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging

__all__ = ["EMA"]


def _ema_with_warmup(decay: float, warmup: bool):
    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = decay
        if warmup:
            # Early on the average follows the weights closely, so short runs are not evaluated with
            # weights that are still mostly the random initialisation.
            n = float(num_averaged)
            d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged + (current - averaged) * (1.0 - d)

    return avg_fn


class EMA(WeightAveraging):
    """Exponential moving average of the weights (and BatchNorm buffers), updated every optimizer step.

    Validation and checkpoints (``state_dict``) use the averaged weights; the raw weights are kept in the
    checkpoint so training resumes exactly. ``warmup`` ramps the decay as ``min(decay, (1+n)/(10+n))``.
    """

    def __init__(self, *, decay: float = 0.9998, warmup: bool = True, update_every_n_steps: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(use_buffers=True, avg_fn=_ema_with_warmup(decay, warmup))
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0
