"""Anchor boxes generated from the feature shapes seen at call time."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch

from backbones.contract import level_of

__all__ = ["AnchorGenerator"]


class AnchorGenerator:
    """EfficientDet anchors: ``num_scales`` octave scales x aspect ratios at every position of every level.

    For level ``l`` (stride ``s = 2**l``) the anchors of cell ``(y, x)`` are centred at
    ``((x + 0.5) * s, (y + 0.5) * s)``; octave ``o`` has base size ``anchor_scale * s * 2**(o / num_scales)``
    and aspect pair ``(ax, ay)`` gives width ``base * ax`` and height ``base * ay``.

    Where the input is not a multiple of ``2**l`` (EfficientDet-Lite0 at 320 px: P7 is 320 / 128 = 2.5 rounded up
    to 3), the map covers the input with a stride of its own, as in effdet and TensorFlow's automl: the input's
    extent (the finest map's size times its stride) divided by the map's size, per axis (320 / 3 for that P7),
    for the centres and the sizes alike. Where it is a multiple, that is ``2**l``.

    Calling it with ``{"p3": (H3, W3), "p4": (H4, W4), ...}`` (levels in increasing order, the shapes of the
    real feature maps) returns ``[sum(H * W) * num_anchors, 4]`` xyxy boxes in input pixels, ordered by
    level, row ``y``, column ``x``, octave, aspect ratio -- the order of the flattened head outputs.
    Results are cached per (shapes, device, dtype); treat the returned tensor as read-only.
    """

    _MAX_CACHE = 16

    def __init__(
        self,
        *,
        anchor_scale: float = 4.0,
        num_scales: int = 3,
        aspect_ratios: Sequence[Sequence[float]] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)),
    ) -> None:
        if not anchor_scale > 0:
            raise ValueError(f"anchor_scale must be positive, got {anchor_scale}")
        if isinstance(num_scales, bool) or int(num_scales) != num_scales or num_scales < 1:
            raise ValueError(f"num_scales must be an integer >= 1, got {num_scales}")
        try:
            ratios = tuple(tuple(float(v) for v in r) for r in aspect_ratios)
        except TypeError as e:
            raise ValueError(
                f"aspect_ratios must be a sequence of (x, y) pairs, got {aspect_ratios!r}"
            ) from e
        if not ratios or any(len(r) != 2 or not min(r) > 0 for r in ratios):
            raise ValueError(
                f"aspect_ratios must be a non-empty sequence of positive (x, y) pairs, got {aspect_ratios!r}"
            )
        self.anchor_scale = float(anchor_scale)
        self.num_scales = int(num_scales)
        self.aspect_ratios = ratios
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map position."""
        return self.num_scales * len(self.aspect_ratios)

    def _sizes(self, stride_x: float, stride_y: float) -> torch.Tensor:
        """``[num_anchors, 2]`` anchor widths and heights at the strides, octave-major, aspect-minor."""
        octaves = torch.arange(self.num_scales, dtype=torch.float64) / self.num_scales
        base = self.anchor_scale * torch.pow(2.0, octaves)  # [S]
        ratios = torch.tensor(self.aspect_ratios, dtype=torch.float64)  # [R, 2]
        strides = torch.tensor([stride_x, stride_y], dtype=torch.float64)
        return (base[:, None, None] * ratios[None] * strides).reshape(-1, 2)

    def _level(self, stride_y: float, stride_x: float, h: int, w: int) -> torch.Tensor:
        """``[h * w * num_anchors, 4]`` anchors of one level, in float64."""
        ys = (torch.arange(h, dtype=torch.float64) + 0.5) * stride_y
        xs = (torch.arange(w, dtype=torch.float64) + 0.5) * stride_x
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centers = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # [HW, 1, 2] as (x, y)
        half = 0.5 * self._sizes(stride_x, stride_y)[None]  # [1, N, 2]
        return torch.cat([centers - half, centers + half], dim=-1).reshape(-1, 4)

    def __call__(
        self,
        feature_shapes: Mapping[str, tuple[int, int]],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        shapes = tuple((name, int(hw[0]), int(hw[1])) for name, hw in feature_shapes.items())
        device = torch.device(device) if device is not None else None
        key = (shapes, device, dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if not shapes:
            raise ValueError("feature_shapes is empty")
        levels = [level_of(name) for name, _, _ in shapes]
        if any(b <= a for a, b in itertools.pairwise(levels)):
            raise ValueError(
                f"feature levels must be in increasing order (finest first), got {list(feature_shapes)}"
            )
        if any(h < 0 or w < 0 for _, h, w in shapes):
            raise ValueError(f"feature shapes must be non-negative, got {dict(feature_shapes)}")
        # The input's extent: the finest map times its stride; a coarser map rounded up spreads over it.
        extent_h, extent_w = shapes[0][1] * 2 ** levels[0], shapes[0][2] * 2 ** levels[0]
        per_level = [
            self._level(extent_h / h if h else 2**lvl, extent_w / w if w else 2**lvl, h, w)
            for lvl, (_, h, w) in zip(levels, shapes)
        ]
        anchors = torch.cat(per_level).to(device=device, dtype=dtype)
        if len(self._cache) >= self._MAX_CACHE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = anchors
        return anchors

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(anchor_scale={self.anchor_scale}, num_scales={self.num_scales}, "
            f"aspect_ratios={self.aspect_ratios})"
        )
