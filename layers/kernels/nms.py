"""Greedy class-wise NMS as one GPU kernel (Triton), for :class:`heads.DetectionPostProcess` on CUDA.

One program per image walks the image's candidates in score order and keeps a candidate when it is valid and no
kept candidate of its class overlaps it with IoU > threshold: the definition of greedy NMS, evaluated directly.
Kept boxes stay in registers (at most ``max_keep`` of them), and the walk stops once ``max_keep`` are kept, so it
never builds the pairwise IoU matrix, never synchronises with the host and has fixed output shapes: the whole
post-processing can be replayed inside a CUDA graph.

The IoU is computed as :func:`torchvision.ops.nms` computes it
(``inter / (area_i + area_j - inter)``, IEEE division, no fused multiply-adds), so the decisions are the same.

With ``TRITON_INTERPRET=1`` in the environment before import, the kernel runs on CPU tensors (Triton's
interpreter); the tests check it that way against a reference NMS.
"""

from __future__ import annotations

import contextlib

import torch

from .dispatch import available, checked, lazy_kernel

__all__ = ["MAX_KEEP_LIMIT", "available", "greedy_nms_scan", "usable"]

#: Most boxes one program keeps (in registers); post-processing with more detections per image uses torchvision's NMS.
MAX_KEEP_LIMIT = 1024


def _build(triton, tl):
    @triton.jit
    def greedy_nms_kernel(boxes_ptr, labels_ptr, valid_ptr, stop_ptr, index_ptr, count_ptr, n, iou_threshold,
                          MAX_KEEP: tl.constexpr, BLOCK: tl.constexpr, HAS_STOP: tl.constexpr):
        image = tl.program_id(0).to(tl.int64)
        slot = tl.arange(0, BLOCK)
        kx1 = tl.zeros([BLOCK], dtype=tl.float32)
        ky1 = tl.zeros([BLOCK], dtype=tl.float32)
        kx2 = tl.zeros([BLOCK], dtype=tl.float32)
        ky2 = tl.zeros([BLOCK], dtype=tl.float32)
        karea = tl.zeros([BLOCK], dtype=tl.float32)
        klabel = tl.full([BLOCK], -1, dtype=tl.int64)
        boxes = boxes_ptr + image * n * 4
        labels = labels_ptr + image * n
        valid = valid_ptr + image * n
        stop = stop_ptr + image * n
        count = tl.zeros([], dtype=tl.int32)
        i = tl.zeros([], dtype=tl.int64)
        going = tl.full([], 1, dtype=tl.int1)
        while (i < n) & (count < MAX_KEEP) & going:
            x1 = tl.load(boxes + 4 * i)
            y1 = tl.load(boxes + 4 * i + 1)
            x2 = tl.load(boxes + 4 * i + 2)
            y2 = tl.load(boxes + 4 * i + 3)
            label = tl.load(labels + i).to(tl.int64)
            ok = tl.load(valid + i) != 0
            if HAS_STOP:  # this candidate and all after it are invalid: the walk ends here
                going = tl.load(stop + i) == 0
            area = (x2 - x1) * (y2 - y1)
            w = tl.maximum(tl.minimum(x2, kx2) - tl.maximum(x1, kx1), 0.0)
            h = tl.maximum(tl.minimum(y2, ky2) - tl.maximum(y1, ky1), 0.0)
            inter = w * h
            iou = tl.math.div_rn(inter, (area + karea) - inter)
            hit = (slot < count) & (klabel == label) & (iou > iou_threshold)
            keep = ok & (tl.max(hit.to(tl.int32), axis=0) == 0)
            put = (slot == count) & keep
            kx1 = tl.where(put, x1, kx1)
            ky1 = tl.where(put, y1, ky1)
            kx2 = tl.where(put, x2, kx2)
            ky2 = tl.where(put, y2, ky2)
            karea = tl.where(put, area, karea)
            klabel = tl.where(put, label, klabel)
            tl.store(index_ptr + image * MAX_KEEP + count, i, mask=keep)
            count += keep.to(tl.int32)
            i += 1
        tl.store(count_ptr + image, count)

    return greedy_nms_kernel


_triton = lazy_kernel(_build)


def greedy_nms_scan(
    boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, iou_threshold: float, max_keep: int,
    *, stop: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-wise greedy NMS of score-sorted candidates: ``boxes [B, n, 4]`` (xyxy), ``labels [B, n]``,
    ``valid [B, n]`` (bool) -> ``index [B, max_keep]`` (int64: the first ``max_keep`` kept candidates of each
    image in score order, -1 after the last) and ``count [B]`` (int64, at most ``max_keep``).

    The kept set is greedy NMS's (as :func:`torchvision.ops.nms` per image and class), cut after ``max_keep``.
    ``stop [B, n]`` (bool, optional) promises that where it is set, that candidate and all later ones of its row
    are invalid (sorted scores below the threshold): the walk ends there instead of visiting them.
    """
    found = _triton()
    if found is None:
        raise RuntimeError("greedy_nms_scan needs Triton (pip install triton)")
    triton, kernel = found
    b, n = labels.shape
    if boxes.shape != (b, n, 4) or valid.shape != (b, n) or (stop is not None and stop.shape != (b, n)):
        raise ValueError(f"boxes [B, n, 4], labels [B, n], valid [B, n], stop [B, n] expected, got "
                         f"{tuple(boxes.shape)}, {tuple(labels.shape)}, {tuple(valid.shape)}, "
                         f"{None if stop is None else tuple(stop.shape)}")
    if not 1 <= max_keep <= MAX_KEEP_LIMIT:
        raise ValueError(f"max_keep must be in [1, {MAX_KEEP_LIMIT}] (the kept boxes live in registers), got {max_keep}")
    index = torch.full((b, max_keep), -1, dtype=torch.int64, device=boxes.device)
    count = torch.empty(b, dtype=torch.int32, device=boxes.device)
    if b == 0:
        return index, count.long()
    block = max(16, triton.next_power_of_2(max_keep))
    valid = valid.contiguous().view(torch.uint8)
    with torch.cuda.device(boxes.device) if boxes.device.type == "cuda" else contextlib.nullcontext():
        kernel[(b,)](
            boxes.float().contiguous(), labels.contiguous(), valid,
            valid if stop is None else stop.contiguous().view(torch.uint8), index, count, n,
            float(iou_threshold), MAX_KEEP=max_keep, BLOCK=block, HAS_STOP=stop is not None,
            num_warps=1 if block <= 128 else 4, enable_fp_fusion=False,
        )
    return index, count.long()


def _probe(device: torch.device) -> bool:
    boxes = torch.tensor([[[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]], device=device)
    index, count = greedy_nms_scan(boxes, torch.zeros(1, 3, dtype=torch.long, device=device),
                                   torch.ones(1, 3, dtype=torch.bool, device=device), 0.5, 3)
    return index.tolist() == [[0, 2, -1]] and count.tolist() == [2]


def usable(device: torch.device) -> bool:
    """:func:`available`, and a first kernel built and run on ``device`` gave the right answer (checked once per
    device; where Triton is installed but cannot build kernels, say without a C compiler, a warning says why and
    the answer is False)."""
    return checked("NMS", device, _probe, "torchvision's NMS")
