"""Anchor boxes generated from the feature shapes seen at call time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from backbones.contract import level_of

__all__ = ["AnchorGenerator"]


class AnchorGenerator:
    """EfficientDet anchors: ``num_scales`` octave scales x aspect ratios at every position of every level.

    For level ``l`` (stride ``s = 2**l``) the anchor centred on cell ``(y, x)`` is at
    ``((x + 0.5) * s, (y + 0.5) * s)`` with base size ``anchor_scale * s * 2**(octave / num_scales)``,
    width ``base * ax`` and height ``base * ay`` for each aspect pair ``(ax, ay)``.
    Returned boxes are xyxy in input pixels, ordered (level, y, x, octave, aspect).
    """

    def __init__(
        self,
        *,
        anchor_scale: float = 4.0,
        num_scales: int = 3,
        aspect_ratios: Sequence[Sequence[float]] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)),
    ) -> None:
        if anchor_scale <= 0:
            raise ValueError(f"anchor_scale must be positive, got {anchor_scale}")
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        ratios = [tuple(float(v) for v in r) for r in aspect_ratios]
        if not ratios or any(len(r) != 2 or min(r) <= 0 for r in ratios):
            raise ValueError(f"aspect_ratios must be positive (x, y) pairs, got {aspect_ratios}")
        self.anchor_scale = float(anchor_scale)
        self.num_scales = num_scales
        self.aspect_ratios = tuple(ratios)
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def num_anchors(self) -> int:
        return self.num_scales * len(self.aspect_ratios)

    def _half_sizes(self, stride: int) -> torch.Tensor:
        """``[num_anchors, 2]`` half widths and heights, octave-major."""
        octaves = torch.arange(self.num_scales, dtype=torch.float64) / self.num_scales
        base = self.anchor_scale * stride * torch.pow(2.0, octaves)  # [S]
        ratios = torch.tensor(self.aspect_ratios, dtype=torch.float64)  # [R, 2]
        return (base[:, None, None] * ratios[None] / 2.0).reshape(-1, 2)

    def __call__(
        self,
        feature_shapes: Mapping[str, tuple[int, int]],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        key = (tuple((k, int(h), int(w)) for k, (h, w) in feature_shapes.items()), str(device), dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        per_level = []
        for name, (h, w) in feature_shapes.items():
            stride = 2 ** level_of(name)
            ys = (torch.arange(h, dtype=torch.float64) + 0.5) * stride
            xs = (torch.arange(w, dtype=torch.float64) + 0.5) * stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            centers = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # [HW, 1, 2]
            half = self._half_sizes(stride)[None]  # [1, A, 2]
            boxes = torch.cat([centers - half, centers + half], dim=-1)  # [HW, A, 4]
            per_level.append(boxes.reshape(-1, 4))
        anchors = torch.cat(per_level).to(device=device, dtype=dtype)
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = anchors
        return anchors
