"""Box <-> delta encoding relative to anchors."""

from __future__ import annotations

import math

import torch

__all__ = ["BoxCoder"]


def _center_size(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """xyxy ``[..., 4]`` -> centre x, centre y, width, height (each ``[...]``)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


class BoxCoder:
    """Encodes xyxy boxes as ``(dx, dy, dw, dh)`` relative to xyxy anchors and decodes them back.

    ``dx = wx * (cx - cxa) / wa``, ``dy = wy * (cy - cya) / ha``, ``dw = ww * log(w / wa)``,
    ``dh = wh * log(h / ha)``, with ``eps`` added to every width and height when encoding so degenerate
    boxes stay finite. Decoding clamps ``dw / ww`` and ``dh / wh`` from above at ``clamp`` before ``exp``
    (``None`` disables it). Leading dimensions broadcast; computation and results are float32 whatever
    the input dtype.
    """

    def __init__(
        self,
        *,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        clamp: float | None = math.log(1000.0 / 16),
        eps: float = 1e-8,
    ) -> None:
        weights = tuple(float(w) for w in weights)
        if len(weights) != 4 or not min(weights) > 0:
            raise ValueError(f"weights must be 4 positive numbers, got {weights}")
        if clamp is not None and not math.isfinite(clamp):
            raise ValueError(f"clamp must be a finite number or None, got {clamp}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.weights = weights
        self.clamp = None if clamp is None else float(clamp)
        self.eps = float(eps)

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """xyxy ``boxes [..., 4]`` relative to xyxy ``anchors [..., 4]`` -> deltas ``[..., 4]`` (float32)."""
        cx, cy, w, h = _center_size(boxes.float())
        cxa, cya, wa, ha = _center_size(anchors.float())
        wa, ha = wa + self.eps, ha + self.eps
        wx, wy, ww, wh = self.weights
        return torch.stack(
            torch.broadcast_tensors(
                wx * (cx - cxa) / wa,
                wy * (cy - cya) / ha,
                ww * torch.log((w + self.eps) / wa),
                wh * torch.log((h + self.eps) / ha),
            ),
            dim=-1,
        )

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Deltas ``[..., 4]`` applied to xyxy ``anchors [..., 4]`` -> xyxy boxes ``[..., 4]`` (float32)."""
        deltas = deltas.float()
        cxa, cya, wa, ha = _center_size(anchors.float())
        wx, wy, ww, wh = self.weights
        dw, dh = deltas[..., 2] / ww, deltas[..., 3] / wh
        if self.clamp is not None:
            dw, dh = dw.clamp(max=self.clamp), dh.clamp(max=self.clamp)
        cx = deltas[..., 0] / wx * wa + cxa
        cy = deltas[..., 1] / wy * ha + cya
        half_w, half_h = 0.5 * torch.exp(dw) * wa, 0.5 * torch.exp(dh) * ha
        return torch.stack(
            torch.broadcast_tensors(cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weights={self.weights}, clamp={self.clamp}, eps={self.eps})"
