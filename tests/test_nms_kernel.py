"""The greedy NMS kernel (layers.kernels.nms) keeps what the reference NMS keeps (tests/nms_reference.py), cut after
max_keep.

Without a GPU it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET before Triton is imported).
"""

from __future__ import annotations

import pytest
import torch
from nms_reference import dense_greedy_nms

from layers.kernels import dispatch as _triton
from layers.kernels import nms as nms_kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not nms_kernel.available(DEVICE), reason="needs Triton")


def _case(g: torch.Generator, b: int, n: int, *, grid: bool):
    xy = torch.rand(b, n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(b, n, 2, generator=g) * 40], -1)
    if grid:  # coordinates on a coarse grid: identical boxes, IoUs exactly at common thresholds, empty boxes
        boxes = (boxes / 10).round() * 10
    labels = torch.randint(0, 3, (b, n), generator=g)
    valid = torch.rand(b, n, generator=g) > 0.2
    return boxes, labels, valid


@pytest.mark.parametrize("threshold", [0.5, 0.0, 1.0, 1 / 3])
@pytest.mark.parametrize("grid", [False, True])
def test_kernel_keeps_what_reference_nms_keeps(threshold, grid):
    g = torch.Generator().manual_seed(int(threshold * 100) + grid)
    boxes, labels, valid = _case(g, 3, 90, grid=grid)
    keep = dense_greedy_nms(boxes, labels, valid, threshold)
    for max_keep in (1, 7, 200):
        index, count = nms_kernel.greedy_nms_scan(
            boxes.to(DEVICE), labels.to(DEVICE), valid.to(DEVICE), threshold, max_keep
        )
        index, count = index.cpu(), count.cpu()
        assert index.shape == (3, max_keep) and index.dtype == count.dtype == torch.int64
        for i in range(3):
            expected = keep[i].nonzero().squeeze(1)[:max_keep]
            assert count[i] == len(expected)
            assert torch.equal(index[i, : len(expected)], expected)
            assert (index[i, len(expected) :] == -1).all()


def test_kernel_on_a_suppression_chain_and_empty_inputs():
    n = 21
    x = torch.arange(n, dtype=torch.float32) * 4.0
    boxes = torch.stack([x, torch.zeros(n), x + 10.0, torch.full((n,), 10.0)], 1)[None]  # IoU(i, i+1) = 0.43
    index, count = nms_kernel.greedy_nms_scan(
        boxes.to(DEVICE), torch.zeros(1, n, dtype=torch.long, device=DEVICE),
        torch.ones(1, n, dtype=torch.bool, device=DEVICE), 0.4, 50,
    )
    assert count.tolist() == [11] and index[0, :11].tolist() == list(range(0, n, 2))
    empty = nms_kernel.greedy_nms_scan(torch.zeros(2, 0, 4, device=DEVICE), torch.zeros(2, 0, dtype=torch.long,
                                       device=DEVICE), torch.zeros(2, 0, dtype=torch.bool, device=DEVICE), 0.5, 3)
    assert empty[1].tolist() == [0, 0] and (empty[0] == -1).all()
    with pytest.raises(ValueError, match="max_keep must be in"):
        nms_kernel.greedy_nms_scan(boxes, torch.zeros(1, n, dtype=torch.long), torch.ones(1, n).bool(), 0.5, 2000)
    with pytest.raises(ValueError, match="expected"):
        nms_kernel.greedy_nms_scan(boxes, torch.zeros(1, n - 1, dtype=torch.long), torch.ones(1, n).bool(), 0.5, 3)


def test_walk_stops_at_the_first_candidate_below_the_threshold_with_nan_first():
    """Post-processing passes ``stop = score < threshold``: scores are sorted, NaN first (as top-k ranks it), so
    every candidate after the first one below the threshold is below it too; the result is the full walk's."""
    g = torch.Generator().manual_seed(5)
    boxes, labels, _ = _case(g, 2, 60, grid=False)
    scores = torch.rand(2, 60, generator=g).sort(1, descending=True).values
    scores[1, :3] = float("nan")
    valid, stop = scores >= 0.4, scores < 0.4
    keep = dense_greedy_nms(boxes, labels, valid, 0.5)
    for s in (None, stop):
        index, count = nms_kernel.greedy_nms_scan(boxes.to(DEVICE), labels.to(DEVICE), valid.to(DEVICE), 0.5, 100,
                                                  stop=None if s is None else s.to(DEVICE))
        for i in range(2):
            expected = keep[i].nonzero().squeeze(1)
            assert count[i].item() == len(expected) > 0
            assert torch.equal(index[i, : len(expected)].cpu(), expected)


def test_auto_falls_back_to_torchvision_when_the_kernel_cannot_run(monkeypatch, refused_kernel):
    monkeypatch.setattr(_triton, "_CHECKED", {})
    assert nms_kernel.usable(DEVICE)  # the interpreter on the CPU, the GPU where there is one
    refused_kernel(nms_kernel, "greedy_nms_scan", DEVICE, f"cannot run on {DEVICE} .*no C compiler")


def test_explicit_triton_impl_is_checked_and_not_exported(monkeypatch):
    from heads import postprocess
    from heads.box_coder import BoxCoder

    many = postprocess.DetectionPostProcess(box_coder=BoxCoder(), max_detections=nms_kernel.MAX_KEEP_LIMIT + 1)
    monkeypatch.setattr(nms_kernel, "usable", lambda device: True)
    assert many._impl(torch.device("cuda")) == "torchvision"  # more kept boxes than a program holds
    assert postprocess.DetectionPostProcess(box_coder=BoxCoder())._impl(torch.device("cuda")) == "triton"
    post = postprocess.DetectionPostProcess(box_coder=BoxCoder(), nms_impl="triton")
    monkeypatch.setattr(postprocess, "_tracing", lambda: True)
    assert post._impl(torch.device("cpu")) == "torchvision"  # an exported graph cannot hold the kernel
    monkeypatch.setattr(postprocess, "_tracing", lambda: False)
    monkeypatch.setattr(nms_kernel, "available", lambda device: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device and Triton"):
        post._impl(torch.device("cpu"))
