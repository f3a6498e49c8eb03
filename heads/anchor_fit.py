"""How well anchors fit a dataset's boxes, and anchor settings that fit them better.

A box "gets a positive anchor" when some anchor has IoU >= the matcher's threshold with it (rule 1 of
:class:`heads.IoUMatcher`; competition between the boxes of one image for the same anchor is left out). With the
matcher's low-quality rule every box that overlaps some anchor also claims its best anchor, however low that IoU.

The best IoU of a box over all anchors is found without the ``[boxes, anchors]`` matrix: for a fixed anchor size the
IoU only falls as the anchor centre moves away from the box centre along either axis, so per level and anchor shape
the best anchor is the one on the grid point nearest the box centre in x and in y. That is ``levels x anchors per
position`` IoUs per box (45 for EfficientDet), so a COCO-sized set of boxes takes seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .anchors import AnchorGenerator

__all__ = ["SIZE_BUCKETS", "anchor_shapes", "best_anchor_iou", "fit_report", "propose_anchors", "size_bucket"]

#: COCO's size buckets by box area (here at the model input): small below 32², medium below 96², large from there up.
SIZE_BUCKETS = (("small", 32.0**2), ("medium", 96.0**2), ("large", math.inf))


def size_bucket(boxes: torch.Tensor) -> torch.Tensor:
    """COCO size bucket of each xyxy box by area ``w * h``: 0 small, 1 medium, 2 large (:data:`SIZE_BUCKETS`)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    limits = torch.tensor([limit for _, limit in SIZE_BUCKETS[:-1]], dtype=area.dtype)
    return torch.bucketize(area, limits, right=True)


def _grid(image_size: tuple[int, int], level: int) -> tuple[int, int]:
    """Feature map ``(H, W)`` of ``level`` for an input of ``image_size``: ``ceil(size / stride)``."""
    stride = 2**level
    return -(-int(image_size[0]) // stride), -(-int(image_size[1]) // stride)


def anchor_shapes(generator: AnchorGenerator, image_size: tuple[int, int], levels: Sequence[int]) -> torch.Tensor:
    """``[levels * anchors per position, 6]`` float64: (stride x, stride y, width, height, map H, map W) of every
    anchor shape on an input of ``image_size``, read from the generator's anchors of the first cell of each level (so
    a map rounded up, with its own stride, is measured as the generator places it)."""
    grids = {f"p{level}": _grid(image_size, level) for level in levels}
    anchors = generator(grids, dtype=torch.float64)
    rows, start, per_cell = [], 0, generator.num_anchors
    for gh, gw in grids.values():
        a = anchors[start: start + per_cell]  # cell (0, 0): centred at half the stride
        start += gh * gw * per_cell
        grid = torch.tensor([[gh, gw]], dtype=torch.float64).expand(per_cell, 2)
        rows.append(torch.cat([a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4], a[:, 2:3] - a[:, 0:1],
                               a[:, 3:4] - a[:, 1:2], grid], dim=1))
    return torch.cat(rows)


def best_anchor_iou(boxes: torch.Tensor, generator: AnchorGenerator, image_size: tuple[int, int],
                    levels: Sequence[int], *, chunk: int = 65536) -> torch.Tensor:
    """Each xyxy box's (``[N, 4]``, input pixels) highest IoU ``[N]`` (float64) with the anchors ``generator`` places on
    an input of ``image_size`` (H, W) at ``levels``: the same as the maximum over the full ``[N, A]`` IoU matrix."""
    stride_x, stride_y, aw, ah, gh, gw = anchor_shapes(generator, image_size, levels).unbind(1)  # [M] each
    boxes = boxes.to(torch.float64).reshape(-1, 4)
    out = []
    for part in boxes.split(chunk):
        x1, y1, x2, y2 = (v[:, None] for v in part.unbind(1))  # [n, 1]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        # The nearest anchor centre (i + 0.5) * stride on the level's grid, along each axis.
        ax = (torch.floor(cx / stride_x).clamp(min=0).minimum(gw - 1) + 0.5) * stride_x  # [n, M]
        ay = (torch.floor(cy / stride_y).clamp(min=0).minimum(gh - 1) + 0.5) * stride_y
        iw = (torch.minimum(x2, ax + aw / 2) - torch.maximum(x1, ax - aw / 2)).clamp(min=0)
        ih = (torch.minimum(y2, ay + ah / 2) - torch.maximum(y1, ay - ah / 2)).clamp(min=0)
        inter = iw * ih
        union = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0) + aw * ah - inter
        out.append((inter / union).amax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def fit_report(boxes: torch.Tensor, generator: AnchorGenerator, image_size: tuple[int, int], levels: Sequence[int],
               *, threshold: float = 0.5) -> dict[str, Any]:
    """Share of boxes with a positive anchor (best IoU >= ``threshold``), share that overlap some anchor (what the
    low-quality rule gives a positive) and the median best IoU, over all boxes and per COCO size bucket (box area at
    the model input)."""
    best = best_anchor_iou(boxes, generator, image_size, levels)
    bucket = size_bucket(boxes.to(torch.float64))

    def summary(iou: torch.Tensor) -> dict[str, Any]:
        n = int(iou.numel())
        return {
            "boxes": n,
            "share_iou_at_threshold": round(float((iou >= threshold).double().mean()), 4) if n else None,
            "share_low_quality": round(float((iou > 0).double().mean()), 4) if n else None,
            "median_best_iou": round(float(iou.median()), 4) if n else None,
        }

    return {"all": summary(best), **{name: summary(best[bucket == k]) for k, (name, _) in enumerate(SIZE_BUCKETS)}}


def _kmeans_1d(values: torch.Tensor, k: int, iterations: int = 50) -> torch.Tensor:
    """``k`` sorted cluster centres of ``values`` (Lloyd's algorithm started at evenly spaced quantiles)."""
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    centres = torch.quantile(values, q)
    for _ in range(iterations):
        nearest = (values[:, None] - centres[None]).abs().argmin(1)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, nearest, values)
        counts = torch.bincount(nearest, minlength=k).to(torch.float64)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        if torch.allclose(updated, centres):
            break
        centres = updated
    return centres.sort().values


def ratio_pairs(log_aspects: torch.Tensor) -> list[list[float]]:
    """Anchor aspect pairs ``[x, y]`` (``x * y = 1``, two decimals) for log aspect ratios ``log(w / h)``."""
    return [[round(math.exp(v / 2), 2), round(math.exp(-v / 2), 2)] for v in log_aspects.tolist()]


def propose_anchors(boxes: torch.Tensor, generator: AnchorGenerator, image_size: tuple[int, int],
                    levels: Sequence[int], *, threshold: float = 0.5, scales: Sequence[float] | None = None,
                    search_boxes: int = 20000, seed: int = 0) -> dict[str, Any]:
    """An ``anchor_scale`` and aspect ratios that give more boxes a positive anchor (IoU >= ``threshold``).

    Candidates: the current aspect ratios and as many from k-means on the boxes' log aspect ratios (each pair with
    ``x * y = 1``), each with every ``anchor_scale`` of ``scales`` (default: 1 to 8 in steps of 2^(1/4), and the
    current one); ``num_scales`` stays. Each candidate is scored on at most ``search_boxes`` of the boxes (a random
    subset fixed by ``seed``) by the share at the threshold; among equal shares the one closest to the current
    settings wins (the current ones where nothing does better), then the one with the higher mean best IoU. The best
    is reported on all boxes, beside the current settings."""
    boxes = boxes.to(torch.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        raise ValueError("no boxes to fit anchors to")
    sample = boxes
    if boxes.shape[0] > search_boxes:
        pick = torch.randperm(boxes.shape[0], generator=torch.Generator().manual_seed(seed))[:search_boxes]
        sample = boxes[pick]
    current_ratios = [list(r) for r in generator.aspect_ratios]
    w, h = (sample[:, 2] - sample[:, 0]).clamp(min=1e-6), (sample[:, 3] - sample[:, 1]).clamp(min=1e-6)
    fitted = ratio_pairs(_kmeans_1d(torch.log(w / h), len(current_ratios)))
    distinct = len({tuple(r) for r in fitted}) == len(fitted)  # boxes of one shape: no second set
    ratio_sets = [current_ratios] + ([fitted] if distinct and fitted != current_ratios else [])
    if scales is None:
        scales = [round(2 ** (i / 4), 2) for i in range(13)]
    scales = sorted({float(s) for s in [*scales, generator.anchor_scale]})

    def score(scale: float, ratios: list[list[float]]) -> tuple[float, float, float]:
        candidate = AnchorGenerator(anchor_scale=scale, num_scales=generator.num_scales, aspect_ratios=ratios)
        best = best_anchor_iou(sample, candidate, image_size, levels)
        closeness = -abs(math.log(scale / generator.anchor_scale)) - (ratios != current_ratios)
        return float((best >= threshold).double().mean()), closeness, float(best.mean())

    scored = [(score(s, r), s, r) for r in ratio_sets for s in scales]
    _, scale, ratios = max(scored, key=lambda item: item[0])
    proposed = AnchorGenerator(anchor_scale=scale, num_scales=generator.num_scales, aspect_ratios=ratios)
    return {
        "anchor_scale": scale,
        "aspect_ratios": ratios,
        "num_scales": generator.num_scales,
        "current": fit_report(boxes, generator, image_size, levels, threshold=threshold),
        "proposed": fit_report(boxes, proposed, image_size, levels, threshold=threshold),
        "candidates": [{"anchor_scale": s, "aspect_ratios": r, "share_iou_at_threshold": round(v[0], 4)}
                       for v, s, r in scored],
        "search_boxes": int(sample.shape[0]),
    }
