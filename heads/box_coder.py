"""Box <-> delta encoding relative to anchors."""

from __future__ import annotations

import math

import torch

__all__ = ["BoxCoder"]


class BoxCoder:
    """Encodes xyxy boxes as ``(dx, dy, dw, dh)`` relative to anchors and decodes them back.

    ``dx = wx * (cx - cxa) / wa``, ``dy = wy * (cy - cya) / ha``, ``dw = ww * log(w / wa)``,
    ``dh = wh * log(h / ha)``. Decoding clamps ``dw, dh`` (after dividing by the weights) at ``clamp``
    so ``exp`` cannot overflow; ``clamp=None`` disables that. Computation is float32.
    """

    def __init__(
        self,
        *,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        clamp: float | None = math.log(1000.0 / 16),
        eps: float = 1e-8,
    ) -> None:
        if len(weights) != 4 or min(weights) <= 0:
            raise ValueError(f"weights must be 4 positive numbers, got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.clamp = clamp
        self.eps = eps

    @staticmethod
    def _center_size(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        boxes, anchors = boxes.float(), anchors.float()
        cx, cy, w, h = self._center_size(boxes)
        cxa, cya, wa, ha = self._center_size(anchors)
        wa, ha = wa + self.eps, ha + self.eps
        wx, wy, ww, wh = self.weights
        return torch.stack(
            [
                wx * (cx - cxa) / wa,
                wy * (cy - cya) / ha,
                ww * torch.log((w + self.eps) / wa),
                wh * torch.log((h + self.eps) / ha),
            ],
            dim=-1,
        )

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        deltas, anchors = deltas.float(), anchors.float()
        cxa, cya, wa, ha = self._center_size(anchors)
        wx, wy, ww, wh = self.weights
        dw, dh = deltas[..., 2] / ww, deltas[..., 3] / wh
        if self.clamp is not None:
            dw, dh = dw.clamp(max=self.clamp), dh.clamp(max=self.clamp)
        cx = deltas[..., 0] / wx * wa + cxa
        cy = deltas[..., 1] / wy * ha + cya
        half_w, half_h = 0.5 * torch.exp(dw) * wa, 0.5 * torch.exp(dh) * ha
        return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)
