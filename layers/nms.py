"""Top-k ranking and class-wise NMS for detection post-processing: exact (ties and NaN ranked as a stable sort
ranks them) and batched; greedy (hard) NMS and Gaussian soft-NMS."""

from __future__ import annotations

import torch
from torchvision.ops import nms

from .kernels.dispatch import tracing

__all__ = ["first_k", "grouped_nms", "ranked_topk", "soft_nms"]


def ranked_topk(cls_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest (anchor, class) logits per image and their flat indices ``anchor * C + class``: exactly
    the first ``k`` of a stable descending sort of all ``A * C`` logits (equal logits by index, NaN first), on
    every device, whatever the batch. Traced and exported graphs get one plain top-k (its own order of ties).

    Ranked in two small steps instead of one top-k over all ``A * C`` logits (millions per image): every logit
    among the first ``k`` belongs to one of the first ``k`` anchors ranked by their best-class logit, equal ones
    by index (an anchor after them is preceded by ``k`` anchors, each holding a logit that comes first), so
    ranking the ``k * C`` logits of those anchors gives the same ``k``. One pass reads the whole map (the
    per-anchor maxima); the rest is small and of fixed shape: no host synchronisation, so it can be captured in
    a CUDA graph, and ties (an untrained head's logits all equal its bias) cost nothing extra.
    """
    b, a, c = cls_logits.shape
    flat = cls_logits.reshape(b, a * c)
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return flat.topk(k, dim=1)
    if k >= a:
        index = first_k(flat, k)
    else:
        anchors = first_k(cls_logits.amax(-1), k)  # [B, k], ascending: the anchors that hold every candidate
        candidates = torch.gather(cls_logits, 1, anchors[..., None].expand(-1, -1, c)).reshape(b, k * c)
        at = first_k(candidates, k)  # candidates are in flat-index order, so `at` is too
        index = torch.gather(anchors, 1, at // c) * c + at % c
    values = flat.gather(1, index)
    by_value = values.sort(dim=1, descending=True, stable=True).indices  # index order kept among equal values
    return values.gather(1, by_value), index.gather(1, by_value)


def first_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``[B, k]``, ascending, of the first ``k`` entries of each row of ``values [B, N]`` in a stable
    descending sort: everything above the ``k``-th value, then the lowest positions among the entries equal to
    it. Fixed shapes, no host synchronisation; NaN ranks above everything (as in :func:`torch.sort`)."""
    n = values.shape[1]
    key = values.nan_to_num(nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)  # comparable; NaN: below
    kth = key.topk(k, dim=1).values[:, -1:]  # the k-th value (which of its equals top-k took does not matter)
    above = key > kth
    tied = key == kth
    places = k - above.sum(1, keepdim=True)  # left for entries equal to the k-th value, lowest positions first
    # NaN comes before +inf: where the k-th value is +inf, NaNs take those places first, then the +infs.
    nan = tied & torch.isnan(values)
    take_nan = nan & (torch.cumsum(nan, 1) <= places)
    rest = tied & ~nan
    take_rest = rest & (torch.cumsum(rest, 1) <= places - take_nan.sum(1, keepdim=True))
    take = above | take_nan | take_rest  # exactly k per row
    slot = torch.where(take, torch.cumsum(take, 1) - 1, k)  # column k: a spare for the rest, cut off below
    out = torch.zeros(values.shape[0], k + 1, dtype=torch.long, device=values.device)
    out.scatter_(1, slot, torch.arange(n, device=values.device).expand_as(slot))
    return out[:, :k]


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each group of candidates that come in score order within their group (each image's candidates
    are ranked); returns the kept indices in ascending order.

    One :func:`torchvision.ops.nms` call per group, on the boxes as given: IoUs are computed in their float32 as
    the Triton kernel computes them, so the two decide alike also at an IoU that rounds to the threshold,
    and one image's non-finite boxes cannot touch another's. The candidates' positions are the scores NMS ranks by,
    so equal scores too are taken in candidate order, as in the other paths.

    Traced (ONNX export, which has one NonMaxSuppression): one call over the batch with every group moved to its
    own region of the plane (offset by ``group * (extent + 1)``), kept indices sorted by score; the shifted float32
    coordinates round, so there an IoU within rounding of the threshold can be decided the other way.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if tracing():
        low = torch.clamp(boxes.min(), max=0)
        extent = boxes.max() - low + 1
        return nms(boxes - low + (groups.to(boxes.dtype) * extent)[:, None], scores, iou_threshold)
    n = boxes.shape[0]
    rank_dtype = torch.float32 if n < 2**24 else torch.float64  # every position exact
    rank = torch.arange(n, 0, -1, dtype=rank_dtype, device=boxes.device)  # descending: candidate order first
    by_group, order = torch.sort(groups, stable=True)  # each group's candidates stay in candidate order
    counts = torch.unique_consecutive(by_group, return_counts=True)[1].tolist()
    kept = [
        index if len(index) == 1 else index[nms(group_boxes, group_rank, iou_threshold)]
        for index, group_boxes, group_rank in zip(order.split(counts), boxes[order].split(counts),
                                                  rank[order].split(counts))
    ]
    return torch.cat(kept).sort().values


def soft_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, *, sigma: float, score_threshold: float,
    max_detections: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian soft-NMS (Bodla et al. 2017) within each (image, label) group, all images at once.

    ``boxes [B, K, 4]`` (xyxy), ``scores [B, K]``, ``labels [B, K]``. Each image runs ``max_detections`` rounds: the
    live candidate with the highest current score (the lowest position on ties) is taken, every live candidate of
    its label has its score multiplied by ``exp(-IoU**2 / sigma)`` (IoU with the taken box; 0 for boxes that do not
    overlap), and candidates whose score is no longer above ``score_threshold`` are dropped. A candidate is live
    from the start when its score is above ``score_threshold`` (NaN never is). Rounds run in step for all images and
    groups; since scores only decrease, the taken scores come out in descending order, as one sequential soft-NMS
    over the image's candidates (with the label as a wall between groups) would take them.

    Returns ``index [B, D]`` (positions of the taken candidates in order, -1 after the last) and their decayed
    ``scores [B, D]`` (0 after the last), ``D = max_detections``. Fixed shapes and no host synchronisation except on
    the CPU, where the rounds stop early once no image has live candidates left; traced graphs unroll the rounds.
    """
    b, k = scores.shape
    device = scores.device
    picks: list[torch.Tensor] = []
    picked: list[torch.Tensor] = []
    if k > 0:
        boxes = boxes.float()
        current = scores.float()
        live = current > score_threshold
        x1, y1, x2, y2 = boxes.unbind(-1)  # [B, K] each
        areas = (x2 - x1) * (y2 - y1)
        positions = torch.arange(k, device=device)[None]
        early_exit = device.type == "cpu" and not tracing()
        for _ in range(max_detections):
            top = torch.where(live, current, -torch.inf).argmax(1, keepdim=True)  # [B, 1]
            took = live.gather(1, top)  # [B, 1]: False once an image has no live candidate
            picks.append(torch.where(took, top, -1))
            picked.append(torch.where(took, current.gather(1, top), 0.0))
            t = boxes.gather(1, top[..., None].expand(-1, -1, 4))  # [B, 1, 4]
            iw = (torch.minimum(x2, t[..., 2]) - torch.maximum(x1, t[..., 0])).clamp(min=0)
            ih = (torch.minimum(y2, t[..., 3]) - torch.maximum(y1, t[..., 1])).clamp(min=0)
            inter = iw * ih
            iou = torch.where(inter > 0, inter / (areas + areas.gather(1, top) - inter), 0.0).nan_to_num(0.0)
            same = (labels == labels.gather(1, top)) & took
            current = torch.where(same, current * torch.exp(-(iou * iou) / sigma), current)
            live = live & (current > score_threshold) & (positions != top)
            if early_exit and not bool(live.any()):
                break
    rest = max_detections - len(picks)
    if rest:  # rounds left out: no live candidate anywhere (or none at all)
        picks.append(torch.full((b, rest), -1, dtype=torch.long, device=device))
        picked.append(torch.zeros(b, rest, dtype=torch.float32, device=device))
    return torch.cat(picks, dim=1), torch.cat(picked, dim=1)
