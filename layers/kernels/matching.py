"""The IoU reductions of anchor matching as one GPU kernel (Triton), for :class:`heads.IoUMatcher` on CUDA.

Matching needs, per anchor, its best ground truth (the highest IoU, the lowest index on ties) and, with low-quality
matches, per ground truth its best anchor. PyTorch operations build the ``[B, G, A]`` IoU matrix and reduce it; here
one program per block of anchors of one image walks the image's ground truths in chunks, keeps the running best per
anchor in registers and writes each ground truth's best anchor within the block, and a small reduction over blocks
finds the overall best: no ``[B, G, A]`` tensor, no host synchronisation, fixed output shapes (so it can be captured
in the training step's CUDA graph).

The IoU is computed as :func:`layers.boxes.box_iou` computes it (the same operations in the same order, IEEE
division, no fused multiply-adds), so every comparison with the thresholds, and every tie, is decided as the
PyTorch path decides it.

With ``TRITON_INTERPRET=1`` in the environment before import, the kernel runs on CPU tensors (Triton's interpreter);
the tests check it that way against the PyTorch reductions.
"""

from __future__ import annotations

import contextlib

import torch

from .dispatch import available, checked, lazy_kernel

__all__ = ["available", "iou_reductions", "reference", "usable"]

_BLOCK_A = 128  # anchors per program
_BLOCK_G = 32  # ground truths per chunk of the walk
_NO_INDEX = 2**31 - 1


def _build(triton, tl):
    @triton.jit
    def match_kernel(anchors_ptr, gt_ptr, valid_ptr, best_iou_ptr, best_gt_ptr, part_iou_ptr, part_idx_ptr, A, G,
                     blocks, NO_INDEX: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr,
                     PER_GT: tl.constexpr):
        block = tl.program_id(0)  # the long axis first: CUDA allows 2**31 - 1 programs there, 65,535 on the others
        image = tl.program_id(1).to(tl.int64)
        a_idx = block * BLOCK_A + tl.arange(0, BLOCK_A)
        a_in = a_idx < A
        anchor = anchors_ptr + a_idx.to(tl.int64) * 4
        ax1 = tl.load(anchor, mask=a_in, other=0.0)
        ay1 = tl.load(anchor + 1, mask=a_in, other=0.0)
        ax2 = tl.load(anchor + 2, mask=a_in, other=0.0)
        ay2 = tl.load(anchor + 3, mask=a_in, other=0.0)
        anchor_area = tl.maximum(ax2 - ax1, 0.0) * tl.maximum(ay2 - ay1, 0.0)
        best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
        best_gt = tl.zeros([BLOCK_A], dtype=tl.int32)
        for g0 in range(0, G, BLOCK_G):
            g_idx = g0 + tl.arange(0, BLOCK_G)
            g_in = g_idx < G
            gt = gt_ptr + (image * G + g_idx) * 4
            gx1 = tl.load(gt, mask=g_in, other=0.0)
            gy1 = tl.load(gt + 1, mask=g_in, other=0.0)
            gx2 = tl.load(gt + 2, mask=g_in, other=0.0)
            gy2 = tl.load(gt + 3, mask=g_in, other=0.0)
            ok = tl.load(valid_ptr + image * G + g_idx, mask=g_in, other=0) != 0
            gt_area = tl.maximum(gx2 - gx1, 0.0) * tl.maximum(gy2 - gy1, 0.0)
            # box_iou(gt, anchors), operation by operation: [BLOCK_A, BLOCK_G]
            iw = tl.minimum(gx2[None, :], ax2[:, None]) - tl.maximum(gx1[None, :], ax1[:, None])
            ih = tl.minimum(gy2[None, :], ay2[:, None]) - tl.maximum(gy1[None, :], ay1[:, None])
            inter = tl.maximum(iw, 0.0) * tl.maximum(ih, 0.0)
            union = (gt_area[None, :] + anchor_area[:, None]) - inter
            iou = tl.math.div_rn(inter, tl.where(union > 0, union, 1.0))
            iou = tl.where(ok[None, :], iou, -1.0)  # invalid ground truths: below every threshold
            iou = tl.where(g_in[None, :], iou, float("-inf"))  # past the last ground truth: never a best
            chunk_best = tl.max(iou, axis=1)
            chunk_gt = tl.min(tl.where(iou == chunk_best[:, None], g_idx[None, :], NO_INDEX), axis=1)
            better = chunk_best > best  # strictly: an earlier chunk keeps its lower index on ties
            best_gt = tl.where(better, chunk_gt, best_gt)
            best = tl.where(better, chunk_best, best)
            if PER_GT:  # each ground truth's best anchor within this block (lowest index on ties)
                column = tl.where(a_in[:, None], iou, float("-inf"))
                gt_best = tl.max(column, axis=0)
                gt_anchor = tl.min(tl.where(column == gt_best[None, :], a_idx[:, None], NO_INDEX), axis=0)
                part = (image * blocks + block) * G + g_idx
                tl.store(part_iou_ptr + part, gt_best, mask=g_in)
                tl.store(part_idx_ptr + part, gt_anchor, mask=g_in)
        out = image * A + a_idx
        tl.store(best_iou_ptr + out, best, mask=a_in)
        tl.store(best_gt_ptr + out, best_gt, mask=a_in)

    return match_kernel


_triton = lazy_kernel(_build)


def iou_reductions(
    gt_boxes: torch.Tensor, anchors: torch.Tensor, gt_valid: torch.Tensor, *, per_gt: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``gt_boxes [B, G, 4]`` (xyxy), ``anchors [A, 4]`` (xyxy), ``gt_valid [B, G]`` (bool) ->

    - ``best_iou [B, A]`` (float32), ``best_gt [B, A]`` (int64): each anchor's highest IoU over the valid ground
      truths and its index (the lowest on ties; -1 and index 0 where an image has none);
    - with ``per_gt``, ``gt_best_iou [B, G]`` (float32), ``gt_best_anchor [B, G]`` (int64): each ground truth's
      highest IoU over the anchors and that anchor's index (the lowest on ties; -1 for an invalid one); else None.

    The same values as ``iou = box_iou(gt_boxes, anchors[None]).masked_fill(~gt_valid[..., None], -1)`` followed
    by ``iou.max(dim=1)`` and ``iou.max(dim=2)``, without the ``[B, G, A]`` tensor (:func:`reference`), with the same
    indices and dtypes. One difference is of sign only: where zero IoUs tie, PyTorch returns the first one, which can
    be -0.0, and the kernel 0.0 (equal numbers, so every comparison and decision is the same). Coordinates must be
    finite: with NaN or infinity the two disagree (the kernel's maxima skip NaN, PyTorch's propagate it).
    ``G >= 1`` and ``A >= 1``.
    """
    found = _triton()
    if found is None:
        raise RuntimeError("iou_reductions needs Triton (pip install triton)")
    triton, kernel = found
    b, g = gt_valid.shape
    a = anchors.shape[0]
    if gt_boxes.shape != (b, g, 4) or anchors.shape != (a, 4):
        raise ValueError(f"gt_boxes [B, G, 4], anchors [A, 4] and gt_valid [B, G] expected, got "
                         f"{tuple(gt_boxes.shape)}, {tuple(anchors.shape)}, {tuple(gt_valid.shape)}")
    if g == 0 or a == 0:
        raise ValueError(f"iou_reductions needs at least one ground truth and one anchor, got G={g}, A={a}")
    if a >= _NO_INDEX or b > 65535:
        raise ValueError(f"iou_reductions takes fewer than 2**31 - 1 anchors and at most 65,535 images, got A={a}, "
                         f"B={b}")
    device = anchors.device
    blocks = triton.cdiv(a, _BLOCK_A)
    best_iou = torch.empty(b, a, dtype=torch.float32, device=device)
    best_gt = torch.empty(b, a, dtype=torch.int32, device=device)
    part_iou = torch.empty(b, blocks, g, dtype=torch.float32, device=device) if per_gt else best_iou
    part_idx = torch.empty(b, blocks, g, dtype=torch.int32, device=device) if per_gt else best_gt
    if b == 0:
        return best_iou, best_gt.long(), *((best_iou.new_empty(0, g), best_gt.new_empty(0, g).long())
                                           if per_gt else (None, None))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(blocks, b)](
            anchors.float().contiguous(), gt_boxes.float().contiguous(),
            gt_valid.to(torch.bool).contiguous().view(torch.uint8), best_iou, best_gt, part_iou, part_idx, a, g,
            blocks, NO_INDEX=_NO_INDEX, BLOCK_A=_BLOCK_A, BLOCK_G=_BLOCK_G, PER_GT=per_gt, num_warps=4,
            enable_fp_fusion=False,
        )
    if not per_gt:
        return best_iou, best_gt.long(), None, None
    gt_best_iou, block = part_iou.max(dim=1)  # the first block holding the maximum: the lowest anchor index
    gt_best_anchor = part_idx.gather(1, block[:, None]).squeeze(1).long()
    return best_iou, best_gt.long(), gt_best_iou, gt_best_anchor


def reference(
    gt_boxes: torch.Tensor, anchors: torch.Tensor, gt_valid: torch.Tensor, *, per_gt: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`iou_reductions` from PyTorch operations, through the ``[B, G, A]`` IoU matrix."""
    from ..boxes import box_iou, matrix_reductions

    return matrix_reductions(box_iou(gt_boxes, anchors[None]), gt_valid.to(torch.bool), per_gt=per_gt)


def _probe(device: torch.device) -> bool:
    # Two images; the second ground truth of image 0 is invalid; anchors 1 and 2 tie for ground truth 0 of image 1,
    # and anchor 3 overlaps nothing (IoU 0 with every ground truth: the first index wins).
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15], [5, 5, 15, 15], [30, 30, 40, 40]], device=device)
    gt = torch.tensor([[[0.0, 0, 10, 10], [30, 30, 40, 40]], [[5, 5, 15, 15], [0, 0, 4, 4]]], device=device)
    valid = torch.tensor([[True, False], [True, True]], device=device)
    got = iou_reductions(gt, anchors, valid)
    want = reference(gt, anchors, valid)
    return got[1].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]] and all(torch.equal(x, y) for x, y in zip(got, want))


def usable(device: torch.device) -> bool:
    """:func:`available`, and a first kernel built and run on ``device`` gave the right answer (checked once per
    device; where Triton is installed but cannot build kernels, a warning says why and the answer is False)."""
    return checked("matching", device, _probe, "the PyTorch IoU matrix")
