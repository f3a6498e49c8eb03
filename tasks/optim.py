"""Optimizer parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

from torch import nn

__all__ = ["WarmupCosine", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights of convs/linears get ``weight_decay``; norm parameters, biases and fusion weights none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class WarmupCosine:
    """Multiplier for ``LambdaLR``: linear warmup from ``warmup_factor`` to 1, then cosine down to ``min_factor``."""

    def __init__(self, *, total_steps: int, warmup_steps: int, warmup_factor: float = 0.1, min_factor: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.warmup_steps = min(max(warmup_steps, 0), total_steps)
        self.warmup_factor = warmup_factor
        self.min_factor = min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            return self.warmup_factor + (1.0 - self.warmup_factor) * alpha
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
