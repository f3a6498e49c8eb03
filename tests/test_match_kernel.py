"""The matching kernel (layers.kernels.matching) finds the best IoUs that the [B, G, A] IoU matrix gives, exactly.

Without a GPU it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET before Triton is imported).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.ops import count_ops
from heads import AnchorGenerator, BoxCoder, IoUMatcher, TargetAssigner
from heads.matcher import box_iou
from layers.kernels import dispatch as _triton
from layers.kernels import matching as match_kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not match_kernel.available(DEVICE), reason="needs Triton")


def _boxes(g: torch.Generator, *shape: int, grid: bool, extent: float = 100.0) -> torch.Tensor:
    xy = torch.rand(*shape, 2, generator=g) * extent
    boxes = torch.cat([xy, xy + torch.rand(*shape, 2, generator=g) * extent * 0.4], -1)
    if grid:  # a coarse grid: identical boxes, tied IoUs, IoUs of exactly 0.5, zero-area boxes
        boxes = (boxes / (extent / 10)).round() * (extent / 10)
    return boxes


def _same(got, want) -> None:
    for x, y in zip(got, want, strict=True):
        if y is None:
            assert x is None
            continue
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.cpu(), y.cpu())


@needs_triton
@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("b,g,a", [(1, 1, 1), (2, 5, 300), (3, 31, 257), (2, 32, 128), (2, 33, 129), (2, 100, 700)])
def test_kernel_equals_the_iou_matrix_reductions(b, g, a, grid):
    gen = torch.Generator().manual_seed(b * 1000 + g * 10 + a + grid)
    gt = _boxes(gen, b, g, grid=grid)
    anchors = _boxes(gen, a, grid=grid)
    valid = torch.rand(b, g, generator=gen) > 0.3
    valid[0, 0] = True
    for per_gt in (True, False):
        want = match_kernel.reference(gt, anchors, valid, per_gt=per_gt)
        got = match_kernel.iou_reductions(gt.to(DEVICE), anchors.to(DEVICE), valid.to(DEVICE), per_gt=per_gt)
        _same(got, want)
    if grid and g > 1:  # the grid does make ties (the kernel must pick the lowest index) and IoUs exactly at 0.5
        iou = box_iou(gt, anchors[None])
        assert (iou == 0.5).any() or g * a < 100
        assert ((iou == want[0][:, None]).sum(1) > 1).any()


@needs_triton
def test_kernel_edge_cases():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 20], [5, 5, 5, 9], [50, 50, 60, 60], [0, 0, 10, 10]])
    gt = torch.tensor([
        [[0.0, 0, 10, 10], [0, 0, 10, 20], [3, 3, 3, 3]],  # identical boxes, IoU 0.5 exactly, an empty box
        [[0.0, 0, 1, 1], [0, 0, 1, 1], [200, 200, 300, 300]],  # duplicates, and a box no anchor overlaps
        [[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]],  # no valid ground truth
    ])
    valid = torch.tensor([[True, True, True], [True, True, True], [False, False, False]])
    got = match_kernel.iou_reductions(gt.to(DEVICE), anchors.to(DEVICE), valid.to(DEVICE))
    want = match_kernel.reference(gt, anchors, valid)
    _same(got, want)
    best_iou, best_gt, gt_best_iou, gt_best_anchor = (t.cpu() for t in got)
    assert best_gt[0].tolist() == [0, 1, 0, 0, 0] and best_iou[0, 1] == 1.0
    assert gt_best_anchor[0].tolist() == [0, 1, 0]  # anchors 0 and 4 tie for ground truth 0: the lower wins
    assert gt_best_iou[1, 2] == 0.0 and gt_best_anchor[1, 2] == 0  # no overlap: IoU 0 everywhere, anchor 0
    assert (best_iou[2] == -1).all() and (best_gt[2] == 0).all() and (gt_best_iou[2] == -1).all()
    with pytest.raises(ValueError, match="at least one ground truth"):
        match_kernel.iou_reductions(gt[:, :0], anchors, valid[:, :0])
    with pytest.raises(ValueError, match="expected"):
        match_kernel.iou_reductions(gt, anchors[:, :3], valid)


@needs_triton
@pytest.mark.parametrize("low_threshold,allow_low_quality", [(None, True), (0.4, True), (None, False), (0.5, False)])
def test_matcher_match_gives_the_matrix_answer(low_threshold, allow_low_quality):
    gen = torch.Generator().manual_seed(7)
    gt = _boxes(gen, 3, 40, grid=True)
    anchors = _boxes(gen, 500, grid=True)
    valid = torch.rand(3, 40, generator=gen) > 0.2
    want = IoUMatcher(threshold=0.5, low_threshold=low_threshold, allow_low_quality=allow_low_quality)(
        box_iou(gt, anchors[None]), valid)
    for impl in ("triton", "torch"):
        matcher = IoUMatcher(threshold=0.5, low_threshold=low_threshold, allow_low_quality=allow_low_quality,
                             impl=impl)
        got = matcher.match(gt.to(DEVICE), anchors.to(DEVICE), valid.to(DEVICE))
        assert torch.equal(got.cpu(), want), impl
    assert (want >= 0).any() and (want == -1).any()


@needs_triton
def test_assigner_targets_equal_with_real_anchors_and_padded_boxes():
    """The training targets of 100-box padded batches (as the captured step pads them) are the same either way."""
    gen = torch.Generator().manual_seed(3)
    shapes = {f"p{level}": (-(-256 // 2**level),) * 2 for level in range(3, 8)}
    anchors = AnchorGenerator()(shapes, device=DEVICE)
    xy = torch.rand(2, 100, 2, generator=gen) * 200
    boxes = torch.cat([xy, xy + 8 + torch.rand(2, 100, 2, generator=gen) * 120], -1)
    labels = torch.randint(0, 90, (2, 100), generator=gen)
    labels[0, 12:] = -1  # padding
    labels[1, 57:] = -1
    out = {}
    for impl in ("torch", "triton"):
        assigner = TargetAssigner(matcher=IoUMatcher(impl=impl), box_coder=BoxCoder())
        out[impl] = assigner(anchors, boxes.to(DEVICE), labels.to(DEVICE))
    for x, y in zip(out["torch"], out["triton"], strict=True):
        assert torch.equal(x, y)
    assert out["torch"][2] > 20  # positives


@needs_triton
def test_backend_choice_and_no_host_synchronisation():
    assert IoUMatcher(impl="auto").backend(torch.device("cpu")) == "torch"  # auto: the kernel on CUDA only
    assert IoUMatcher(impl="triton").backend(DEVICE) == "triton"
    assert IoUMatcher().backend(DEVICE) == "torch"  # the default until a GPU run measures the kernel
    if DEVICE.type == "cuda":
        assert IoUMatcher(impl="auto").backend(DEVICE) == "triton"
    with pytest.raises(ValueError, match="impl must be"):
        IoUMatcher(impl="fast")
    assert "impl='triton'" in repr(IoUMatcher(impl="triton"))
    gen = torch.Generator().manual_seed(1)
    anchors = _boxes(gen, 300, grid=False).to(DEVICE)
    boxes, labels = _boxes(gen, 2, 10, grid=False).to(DEVICE), torch.randint(0, 5, (2, 10), generator=gen).to(DEVICE)
    assigner = TargetAssigner(matcher=IoUMatcher(impl="triton"), box_coder=BoxCoder())
    assert count_ops(lambda: assigner(anchors, boxes, labels)).host_syncs == 0


@needs_triton
def test_kernel_with_other_dtypes_layouts_and_coordinates():
    """Inputs are taken as float32 (as box_iou takes them), in any layout; negative and large coordinates."""
    gen = torch.Generator().manual_seed(11)
    for offset, extent in ((0.0, 100.0), (-5e3, 1e4), (1e5, 3e3)):
        gt = _boxes(gen, 2, 40, grid=True, extent=extent) + offset
        anchors = _boxes(gen, 300, grid=True, extent=extent) + offset
        valid = torch.rand(2, 40, generator=gen) > 0.3
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            if dtype in (torch.float16, torch.bfloat16) and offset:
                continue  # beyond their precision: both sides round the same way, but nothing new is tested
            g, a = gt.to(dtype), anchors.to(dtype)
            _same(match_kernel.iou_reductions(g.to(DEVICE), a.to(DEVICE), valid.to(DEVICE)),
                  match_kernel.reference(g, a, valid))
        # non-contiguous: every other box of a wider batch, anchors as columns of a transposed tensor
        wide = torch.stack([gt, gt.flip(1)], 2).flatten(1, 2)
        cols = anchors.t().contiguous().t()
        assert not wide[:, ::2].is_contiguous() and not cols.is_contiguous()
        _same(match_kernel.iou_reductions(wide[:, ::2].to(DEVICE), cols.to(DEVICE), valid.to(DEVICE)),
              match_kernel.reference(gt, anchors, valid))
    empty = match_kernel.iou_reductions(gt[:0].to(DEVICE), anchors.to(DEVICE), valid[:0].to(DEVICE))
    assert [tuple(t.shape) for t in empty] == [(0, 300), (0, 300), (0, 40), (0, 40)]


@needs_triton
def test_auto_falls_back_to_the_iou_matrix_when_the_kernel_cannot_run(monkeypatch, refused_kernel):
    real = match_kernel.iou_reductions
    monkeypatch.setattr(_triton, "_CHECKED", {})
    assert match_kernel.usable(DEVICE)  # the interpreter on the CPU, the GPU where there is one
    refused_kernel(match_kernel, "iou_reductions", DEVICE, f"matching kernel cannot run on {DEVICE} .*no C compiler")

    def one_index_off(*args, **kwargs):
        best_iou, best_gt, *rest = real(*args, **kwargs)
        return (best_iou, best_gt.flip(-1), *rest)

    refused_kernel(match_kernel, "iou_reductions", DEVICE, f"matching kernel gave a wrong answer on {DEVICE}",
                   one_index_off)
    monkeypatch.setattr(match_kernel, "usable", lambda device: False)
    assert IoUMatcher(impl="auto").backend(torch.device("cuda")) == "torch"


def test_backend_rules_without_running_a_kernel(monkeypatch):
    from layers.kernels import dispatch as shared

    monkeypatch.setattr(match_kernel, "usable", lambda device: True)
    assert IoUMatcher(impl="auto").backend(torch.device("cuda")) == "triton"
    assert IoUMatcher().backend(torch.device("cuda")) == "torch"
    assert IoUMatcher(impl="auto").backend(torch.device("cpu")) == "torch"
    monkeypatch.setattr(shared, "tracing", lambda: True)  # traced, exported or compiled: PyTorch operations
    assert IoUMatcher(impl="triton").backend(torch.device("cuda")) == "torch"


def test_a_subclass_with_its_own_rules_keeps_them():
    """TargetAssigner calls match(); a matcher subclass that changes __call__ (the rules on an IoU matrix) is
    still given the matrix."""

    class EveryoneBackground(IoUMatcher):
        def __call__(self, iou, gt_valid):
            return torch.full((iou.shape[0], iou.shape[2]), -1, dtype=torch.long)

    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    boxes, labels = torch.tensor([[[0.0, 0, 10, 10]]]), torch.tensor([[3]])
    cls_t, _, num_pos = TargetAssigner(matcher=EveryoneBackground(impl="torch"), box_coder=BoxCoder())(
        anchors, boxes, labels)
    assert cls_t.tolist() == [[-1, -1]] and num_pos == 0
    cls_t, _, num_pos = TargetAssigner(matcher=IoUMatcher(impl="torch"), box_coder=BoxCoder())(anchors, boxes, labels)
    assert cls_t.tolist() == [[3, -1]] and num_pos == 1
