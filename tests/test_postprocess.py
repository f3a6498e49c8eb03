"""DetectionPostProcess: NMS edge cases, top-k, score threshold, padding, clipping, and equality with a
naive per-image reference written here."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from heads.box_coder import BoxCoder
from heads.postprocess import DetectionPostProcess
from layers.kernels import nms as nms_kernel
from layers.nms import ranked_topk

CODER = BoxCoder()


def _logit(p) -> torch.Tensor:
    return torch.logit(torch.as_tensor(p, dtype=torch.float64)).float()


@pytest.fixture(params=["torchvision", "triton"], autouse=True)
def nms_impl(request, monkeypatch):
    """Every test runs with each NMS implementation (triton is the default on CUDA, torchvision elsewhere).
    Without a GPU the Triton kernel runs in Triton's interpreter (``tests/conftest.py``)."""
    if request.param == "triton" and not nms_kernel.available(torch.device("cpu" if not torch.cuda.is_available()
                                                                          else "cuda")):
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(DetectionPostProcess, "_default_impl", request.param, raising=False)
    return request.param


def _post(**kw) -> DetectionPostProcess:
    kw.setdefault("nms_impl", getattr(DetectionPostProcess, "_default_impl", "auto"))
    return DetectionPostProcess(box_coder=CODER, **kw)


def _diagonal_boxes(n: int, size: float = 10.0, step: float = 20.0) -> torch.Tensor:
    """``n`` disjoint boxes along the diagonal."""
    xy = torch.arange(n, dtype=torch.float32)[:, None] * step
    return torch.cat([xy, xy, xy + size, xy + size], 1)


def _check_padding(out: dict, b: int, n: int) -> None:
    assert torch.equal(out["scores"][b, n:], torch.zeros_like(out["scores"][b, n:]))
    assert torch.equal(out["boxes"][b, n:], torch.zeros_like(out["boxes"][b, n:]))
    assert (out["labels"][b, n:] == -1).all()


def test_output_shapes_dtypes_and_padding():
    anchors = _diagonal_boxes(3)
    cls = torch.tensor([[[_logit(0.9)], [_logit(0.2)], [_logit(0.6)]]]).to(torch.bfloat16)
    out = _post(max_detections=5)(cls, torch.zeros(1, 3, 4, dtype=torch.bfloat16), anchors, (100, 100))
    assert out["boxes"].shape == (1, 5, 4) and out["boxes"].dtype == torch.float32
    assert out["scores"].shape == (1, 5) and out["scores"].dtype == torch.float32
    assert out["labels"].dtype == torch.int64 and out["num_detections"].dtype == torch.int64
    assert out["num_detections"].tolist() == [3]
    # Sorted by score: anchors 0, 2, 1 (bf16 logits, hence the tolerance).
    assert out["scores"][0, :3].tolist() == pytest.approx([0.9, 0.6, 0.2], abs=5e-3)
    assert torch.equal(out["boxes"][0, :3], anchors[[0, 2, 1]])
    assert out["labels"][0].tolist() == [0, 0, 0, -1, -1]
    _check_padding(out, 0, 3)


@pytest.mark.parametrize("topk", [2, 5000])  # fewer candidates than anchors (the two-step top-k), and all
def test_an_empty_batch_gives_empty_outputs(topk):
    anchors = _diagonal_boxes(3)
    out = _post(max_detections=5, topk=topk)(torch.zeros(0, 3, 4), torch.zeros(0, 3, 4), anchors, (100, 100))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "boxes": (0, 5, 4), "scores": (0, 5), "labels": (0, 5), "num_detections": (0,)}


def test_nothing_above_score_threshold_gives_only_padding():
    anchors = _diagonal_boxes(4)
    cls = torch.full((2, 4, 3), _logit(0.49).item())
    out = _post(score_threshold=0.5, max_detections=3)(cls, torch.zeros(2, 4, 4), anchors, (100, 100))
    assert out["num_detections"].tolist() == [0, 0]
    for b in range(2):
        _check_padding(out, b, 0)
    # The threshold is inclusive: a score equal to it is kept.
    cls[1, 2, 1] = _logit(0.5)
    out = _post(score_threshold=0.5, max_detections=3)(cls, torch.zeros(2, 4, 4), anchors, (100, 100))
    assert out["num_detections"].tolist() == [0, 1]
    assert out["labels"][1, 0].item() == 1 and out["scores"][1, 0].item() == 0.5
    assert torch.equal(out["boxes"][1, 0], anchors[2])


def test_identical_boxes_one_survives_per_class():
    anchors = torch.tensor([[10.0, 10.0, 30.0, 40.0]] * 4)
    cls = torch.stack([_logit([0.6, 0.9, 0.7, 0.8]), _logit([0.3, 0.2, 0.55, 0.1])], dim=-1)[
        None
    ]  # [1, 4, 2]
    out = _post()(cls, torch.zeros(1, 4, 4), anchors, (100, 100))
    assert out["num_detections"].tolist() == [2]
    assert out["labels"][0, :2].tolist() == [0, 1]
    assert out["scores"][0, :2].tolist() == pytest.approx([0.9, 0.55], abs=1e-6)
    assert torch.equal(out["boxes"][0, :2], anchors[:2])
    _check_padding(out, 0, 2)


def test_same_box_different_classes_all_survive():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    cls = torch.tensor([[[2.0, 1.0, -1.0]]])
    out = _post()(cls, torch.zeros(1, 1, 4), anchors, (100, 100))
    assert out["num_detections"].tolist() == [3]
    assert out["labels"][0, :3].tolist() == [0, 1, 2]
    torch.testing.assert_close(out["scores"][0, :3], torch.sigmoid(torch.tensor([2.0, 1.0, -1.0])))
    assert torch.equal(out["boxes"][0, :3], anchors.expand(3, 4))


@pytest.mark.parametrize(
    "pair",
    [
        [[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0]],  # intersection 2, union 4
        [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]],  # intersection 50, union 100
    ],
)
def test_iou_exactly_at_threshold_is_kept(pair):
    """Documented rule: a box is suppressed only when its IoU is strictly greater than ``iou_threshold``."""
    anchors = torch.tensor(pair)
    assert box_iou(anchors[:1], anchors[1:]).item() == 0.5
    cls = torch.stack([_logit(0.9), _logit(0.8)])[None, :, None]
    out = _post(iou_threshold=0.5)(cls, torch.zeros(1, 2, 4), anchors, (100, 100))
    assert out["num_detections"].tolist() == [2]
    out = _post(iou_threshold=0.49)(cls, torch.zeros(1, 2, 4), anchors, (100, 100))
    assert out["num_detections"].tolist() == [1]
    assert torch.equal(out["boxes"][0, 0], anchors[0])


def test_iou_is_decided_in_float32_by_every_implementation():
    """Two boxes whose IoU is 0.50000006 in float32 (the arithmetic of torchvision's NMS on float32 boxes, and of the
    Triton kernel) but exactly 0.5 in float64: suppressed at threshold 0.5 by every implementation."""
    anchors = torch.tensor([[80.97738647460938, 237.1022186279297, 105.05278015136719, 285.92535400390625],
                            [89.00251770019531, 237.1022186279297, 113.07791137695312, 285.92535400390625]])
    boxes = CODER.decode(torch.zeros(2, 4), anchors)
    assert box_iou(boxes[:1], boxes[1:]).item() > 0.5 == box_iou(boxes[:1].double(), boxes[1:].double()).item()
    cls = torch.stack([_logit(0.9), _logit(0.8)])[None, :, None]
    out = _post(iou_threshold=0.5)(cls, torch.zeros(1, 2, 4), anchors, (400, 400))
    assert out["num_detections"].tolist() == [1]


@pytest.mark.parametrize("bad", ["nan_delta", "overflowing_delta"])
def test_an_image_with_non_finite_boxes_leaves_the_others_alone(bad):
    """One image's NaN or infinite box (a NaN delta; an overflowing one without clipping) changes nothing in the
    other images of its batch: each image's detections are those it gets alone."""
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(60, 2, generator=g) * 15  # crowded: many overlaps above the threshold
    anchors = torch.cat([xy, xy + 20], 1)
    cls = torch.randn(2, 60, 3, generator=g)
    deltas = torch.randn(2, 60, 4, generator=g) * 0.1
    deltas[1, 5] = float("nan") if bad == "nan_delta" else torch.tensor([0.0, 0.0, 100.0, 100.0])
    kw = {"clip_boxes": bad == "nan_delta", "max_detections": 20, "nms_prefix": None}
    post = _post(iou_threshold=0.5, **kw)
    both = post(cls, deltas, anchors, (100, 100))
    alone = post(cls[:1], deltas[:1], anchors, (100, 100))
    unsuppressed = _post(iou_threshold=1.0, **kw)(cls[:1], deltas[:1], anchors, (100, 100))
    assert not torch.equal(alone["boxes"], unsuppressed["boxes"])  # NMS did suppress in image 0
    assert both["num_detections"][0] == alone["num_detections"][0]
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(both[key][0], alone[key][0]), key


def test_a_nan_score_is_never_a_detection():
    """A NaN class logit gives no detection, also with no score threshold (``score >= 0`` is false for NaN)."""
    cls = torch.stack([_logit(0.9), torch.tensor(float("nan")), _logit(0.8)])[None, :, None]
    out = _post(score_threshold=0.0)(cls, torch.zeros(1, 3, 4), _diagonal_boxes(3), (100, 100))
    assert out["num_detections"].tolist() == [2]
    assert torch.isfinite(out["scores"]).all()
    assert out["scores"][0, :2].tolist() == pytest.approx([0.9, 0.8])


def test_more_candidates_than_max_detections():
    g = torch.Generator().manual_seed(0)
    anchors = _diagonal_boxes(50)
    cls = torch.randn(2, 50, 2, generator=g)
    out = _post(max_detections=7)(cls, torch.zeros(2, 50, 4), anchors, (2000, 2000))
    assert out["num_detections"].tolist() == [7, 7]
    for b in range(2):
        # Disjoint boxes: nothing is suppressed, so the output is the top 7 of all 100 (anchor, class) pairs.
        top = cls[b].reshape(-1).topk(7)
        torch.testing.assert_close(out["scores"][b], torch.sigmoid(top.values))
        assert out["labels"][b].tolist() == (top.indices % 2).tolist()
        assert torch.equal(out["boxes"][b], anchors[top.indices // 2])


def test_topk_limits_candidates_before_nms():
    anchors = _diagonal_boxes(10)
    cls = torch.linspace(-2, 2, 10).reshape(1, 10, 1)
    out = _post(topk=3, max_detections=10)(cls, torch.zeros(1, 10, 4), anchors, (500, 500))
    assert out["num_detections"].tolist() == [3]
    assert torch.equal(out["boxes"][0, :3], anchors[[9, 8, 7]])
    # topk larger than A * C is capped.
    out = _post(topk=5000, max_detections=20)(cls, torch.zeros(1, 10, 4), anchors, (500, 500))
    assert out["num_detections"].tolist() == [10]


def test_decode_and_clip_to_image_or_per_image_region():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-5.0, -5.0, 30.0, 30.0]])
    # Anchor 0 shifted by half its width and doubled in width: centre (10, 5), 20 x 10 -> [0, 0, 20, 10].
    deltas = torch.tensor([[0.5, 0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0, 0.0]]).expand(2, 2, 4)
    cls = torch.tensor([[[3.0], [2.0]], [[3.0], [2.0]]])
    out = _post()(cls, deltas, anchors, torch.tensor([[20.0, 25.0], [100.0, 15.0]]))  # per-image (H, W)
    torch.testing.assert_close(
        out["boxes"][0, :2], torch.tensor([[0.0, 0.0, 20.0, 10.0], [0.0, 0.0, 25.0, 20.0]])
    )
    torch.testing.assert_close(
        out["boxes"][1, :2], torch.tensor([[0.0, 0.0, 15.0, 10.0], [0.0, 0.0, 15.0, 30.0]])
    )
    out = _post()(cls, deltas, anchors, (100, 100))
    torch.testing.assert_close(out["boxes"][1, 1], torch.tensor([0.0, 0.0, 30.0, 30.0]))
    out = _post(clip_boxes=False)(cls, deltas, anchors, (20, 20))
    torch.testing.assert_close(out["boxes"][1, 1], anchors[1])


def _greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """Textbook greedy NMS: visit by descending score, keep a box unless it overlaps a kept one by > thr."""
    keep: list[int] = []
    for i in torch.argsort(scores, descending=True).tolist():
        if all(box_iou(boxes[i : i + 1], boxes[k : k + 1]).item() <= thr for k in keep):
            keep.append(i)
    return keep


def _reference(cls, deltas, anchors, hw, *, topk, score_threshold, iou_threshold, max_det):
    """One image at a time, one class at a time."""
    results = []
    for i in range(cls.shape[0]):
        candidates = []  # (score, label, box)
        logits = cls[i].reshape(-1)
        order = torch.argsort(logits, descending=True)[:topk].tolist()
        c = cls.shape[2]
        for idx in order:
            a, k = divmod(idx, c)
            score = torch.sigmoid(logits[idx]).item()
            if score < score_threshold:
                continue
            box = CODER.decode(deltas[i, a], anchors[a])
            box = torch.stack(
                [
                    box[0].clamp(0, hw[1]),
                    box[1].clamp(0, hw[0]),
                    box[2].clamp(0, hw[1]),
                    box[3].clamp(0, hw[0]),
                ]
            )
            candidates.append((score, k, box))
        kept = []
        for k in sorted({lab for _, lab, _ in candidates}):
            mine = [cand for cand in candidates if cand[1] == k]
            boxes = torch.stack([m[2] for m in mine])
            scores = torch.tensor([m[0] for m in mine])
            kept += [mine[j] for j in _greedy_nms(boxes, scores, iou_threshold)]
        kept.sort(key=lambda t: -t[0])
        results.append(kept[:max_det])
    return results


@pytest.mark.parametrize("nms_prefix", [None, 1, 6, 512])
@pytest.mark.parametrize(
    "topk, score_threshold, iou_threshold, max_det",
    [(150, 0.3, 0.5, 12), (5000, 0.0, 0.3, 400), (20, 0.0, 0.7, 5), (160, 0.0, 0.5, 30)],
)
def test_batch_equals_naive_per_image_loop(topk, score_threshold, iou_threshold, max_det, nms_prefix):
    """Also with NMS tried on a prefix of the candidates first (``nms_prefix`` 1 and 6 need widening)."""
    g = torch.Generator().manual_seed(1)
    b, a, c = 3, 40, 4
    xy = torch.rand(a, 2, generator=g) * 60
    anchors = torch.cat([xy, xy + torch.rand(a, 2, generator=g) * 30 + 5], 1)  # overlapping clutter
    cls = torch.randn(b, a, c, generator=g) * 2
    cls[1] = torch.randn(a, c, generator=g) - 20.0  # image 1: every score below 1e-6
    deltas = torch.randn(b, a, 4, generator=g) * 0.2
    post = _post(
        topk=topk, score_threshold=score_threshold, iou_threshold=iou_threshold, max_detections=max_det,
        nms_prefix=nms_prefix,
    )
    out = post(cls, deltas, anchors, (80, 90))
    ref = _reference(
        cls,
        deltas,
        anchors,
        (80, 90),
        topk=topk,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_det=max_det,
    )
    if score_threshold > 0:
        assert out["num_detections"][1].item() == 0 and len(ref[1]) == 0
    assert sum(len(r) for r in ref) > 0
    for i, kept in enumerate(ref):
        n = len(kept)
        assert out["num_detections"][i].item() == n
        torch.testing.assert_close(out["scores"][i, :n], torch.tensor([s for s, _, _ in kept]))
        assert out["labels"][i, :n].tolist() == [k for _, k, _ in kept]
        if n:
            torch.testing.assert_close(out["boxes"][i, :n], torch.stack([bx for _, _, bx in kept]))
        _check_padding(out, i, n)
        # The batch does not leak between images: each image alone gives the same rows.
        alone = post(cls[i : i + 1], deltas[i : i + 1], anchors, (80, 90))
        for key in ("boxes", "scores", "labels", "num_detections"):
            assert torch.equal(alone[key][0], out[key][i])


@pytest.mark.parametrize(
    "kwargs",
    [{"topk": 0}, {"max_detections": 0}, {"score_threshold": -0.1}, {"iou_threshold": 1.5}],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        _post(**kwargs)


def test_prefix_nms_equals_full_nms_on_clustered_candidates(nms_impl):
    """A trained detector's top candidates crowd around few objects, so most of them are suppressed and
    the prefix must widen several times; the result equals NMS over all candidates. (The Triton kernel takes
    all candidates at once and walks them until it has ``max_detections``.)"""
    g = torch.Generator().manual_seed(3)
    b, a, c = 2 if nms_impl == "triton" else 4, 3000, 5  # 2: the kernel is slow in Triton's CPU interpreter
    centres = torch.rand(6, 2, generator=g) * 400
    which = torch.randint(0, 6, (a,), generator=g)
    xy = centres[which] + torch.randn(a, 2, generator=g) * 4
    anchors = torch.cat([xy - 20, xy + 20], 1)
    cls = torch.randn(b, a, c, generator=g) * 3
    deltas = torch.randn(b, a, 4, generator=g) * 0.05
    full = _post(topk=5000, max_detections=100, nms_prefix=None, nms_impl="torchvision")(
        cls, deltas, anchors, (480, 480)
    )
    calls = []
    post = _post(topk=5000, max_detections=100, nms_prefix=16)
    inner = post._nms
    post._nms = lambda scores, *rest: calls.append(scores.shape[1]) or inner(scores, *rest)
    out = post(cls, deltas, anchors, (480, 480))
    if nms_impl == "triton":
        assert calls == [5000], calls
    else:
        assert len(calls) >= 3, calls  # the prefix was widened
    for key in ("boxes", "scores", "labels", "num_detections"):
        assert torch.equal(out[key], full[key]), key


def test_bf16_logits_rank_like_their_float32_values():
    g = torch.Generator().manual_seed(4)
    cls = torch.randn(2, 500, 3, generator=g).bfloat16()
    anchors = _diagonal_boxes(500)
    deltas = torch.zeros(2, 500, 4)
    a = _post(max_detections=50)(cls, deltas, anchors, (1e4, 1e4))
    b = _post(max_detections=50)(cls.float(), deltas, anchors, (1e4, 1e4))
    torch.testing.assert_close(a["scores"], b["scores"])  # same values; ties may come in another order
    assert a["num_detections"].tolist() == b["num_detections"].tolist() == [50, 50]


def _ranked(cls: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference ranking: all logits of each image sorted, best first, equal ones by index (NaN first)."""
    flat = cls.reshape(cls.shape[0], -1)
    values, index = flat.sort(dim=1, descending=True, stable=True)
    return values[:, :k], index[:, :k]


def _assert_ranked(cls: torch.Tensor, k: int, values: torch.Tensor, index: torch.Tensor) -> None:
    """``(values, index)`` is exactly the first ``k`` of a stable descending sort of each image's logits: equal
    logits by index, also those equal to the ``k``-th value (which of them make the cut)."""
    ref_values, ref_index = _ranked(cls, k)
    assert torch.equal(values, ref_values)
    assert torch.equal(index, ref_index)


@pytest.mark.parametrize(
    "b, a, c, k, dtype",
    [(1, 3000, 90, 500, torch.float32), (3, 2000, 7, 500, torch.float32), (2, 3000, 90, 500, torch.bfloat16),
     (2, 3000, 90, 1000, torch.float16), (3, 2000, 7, 2000, torch.float32), (2, 100, 4, 300, torch.float32),
     (2, 3000, 90, 5000, torch.bfloat16), (2, 400, 20, 400, torch.float32), (1, 50, 3, 150, torch.float32)],
)
def test_topk_ranks_like_a_full_sort(b, a, c, k, dtype):
    """The two-step ranking (per-anchor maxima, then the logits of the best k anchors; k < A) gives the k largest
    logits of a full sort, ties by index; bf16 and fp16 logits have many ties; k >= A (down to k = A * C) takes
    one plain top-k, re-ordered the same way."""

    g = torch.Generator().manual_seed(5)
    cls = (torch.randn(b, a, c, generator=g) * 2 - 4).to(dtype)
    cls[0, :10] += 8.0  # a few confident anchors
    values, index = ranked_topk(cls, k)
    assert values.dtype == dtype and index.dtype == torch.long
    _assert_ranked(cls, k, values, index)


@pytest.mark.parametrize("seed", range(4))
def test_topk_with_special_values_ranks_like_a_full_sort(seed):
    """Small maps of NaN, +-inf, +-0 and a few repeated values, every k (both paths: k < A and k >= A): the first k
    of a stable descending sort, NaN before +inf also at the cut, and each k's ranking begins the next one's."""

    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, 2.0, -1.0])
    for _ in range(40):
        b, a, c = (int(v) for v in torch.randint(1, 6, (3,), generator=g))
        cls = pool[torch.randint(0, len(pool), (b, a, c), generator=g)]
        if seed % 2:
            cls = cls.bfloat16()
        ref_values, ref_index = _ranked(cls, a * c)
        previous = None
        for k in range(1, a * c + 1):
            values, index = ranked_topk(cls, k)
            torch.testing.assert_close(values, ref_values[:, :k], rtol=0, atol=0, equal_nan=True)
            assert torch.equal(index, ref_index[:, :k]), (cls, k)
            if previous is not None:
                assert torch.equal(index[:, :-1], previous)
            previous = index


def test_topk_with_nan_logits_ranks_them_first_like_topk():

    g = torch.Generator().manual_seed(7)
    cls = torch.randn(2, 500, 6, generator=g)
    cls[0, 123, 4] = cls[0, 7, 1] = cls[1, 499, 0] = float("nan")
    values, index = ranked_topk(cls, 50)
    ref_values, ref_index = _ranked(cls, 50)
    assert index[0, :2].tolist() == [7 * 6 + 1, 123 * 6 + 4] and index[1, 0].item() == 499 * 6
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(index, ref_index)


def test_reference_nms_equals_torchvision_nms_and_settles_long_chains():
    """The tests' reference NMS (tests/nms_reference.py) is greedy NMS: a chain of boxes each overlapping the next
    keeps every other one, and random cases keep what torchvision keeps."""
    from nms_reference import dense_greedy_nms
    from torchvision.ops import nms

    n = 41
    x = torch.arange(n, dtype=torch.float32) * 4.0
    boxes = torch.stack([x, torch.zeros(n), x + 10.0, torch.full((n,), 10.0)], 1)  # IoU(i, i+1) = 0.43
    keep = dense_greedy_nms(boxes[None], torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.bool), 0.4)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[nms(boxes, torch.linspace(1, 0, n), 0.4)] = True
    assert expected.tolist() == [i % 2 == 0 for i in range(n)]
    assert torch.equal(keep[0], expected)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        b, n, c = 3, 300, 4
        xy = torch.rand(b, n, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + torch.rand(b, n, 2, generator=g) * 40 + 1], -1)
        labels = torch.randint(0, c, (b, n), generator=g)
        valid = torch.rand(b, n, generator=g) > 0.1
        keep = dense_greedy_nms(boxes, labels, valid, 0.5)
        for i in range(b):
            idx = torch.nonzero(valid[i]).squeeze(1)
            ref = torch.zeros(n, dtype=torch.bool)
            order_scores = torch.linspace(1, 0, n)
            for label in labels[i, idx].unique():  # class by class, on the float32 boxes
                sel = idx[labels[i, idx] == label]
                ref[sel[nms(boxes[i, sel], order_scores[sel], 0.5)]] = True
            assert torch.equal(keep[i], ref)


def test_topk_of_tied_logits_ranks_no_more_than_k_anchors():
    """An untrained head's class logits all equal its bias: every logit ties. The ranking still reads the whole
    map only once (the per-anchor maxima) and ranks no more than the best k anchors' logits, and makes no host
    synchronisation (so the predict call can be captured in a CUDA graph)."""
    from torch.utils._python_dispatch import TorchDispatchMode


    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ranked, self.names = [], set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.names.add(name)
            if name in ("sort", "topk"):
                self.ranked.append(args[0].numel())
            return func(*args, **(kwargs or {}))

    b, a, c, k = 2, 5000, 90, 500
    cls = torch.full((b, a, c), -4.6)
    cls[1, 7, 3] = 1.0
    with Sizes() as ops:
        values, index = ranked_topk(cls, k)
    assert max(ops.ranked) == b * k * c  # the k best anchors' logits, not the b * a * c of the map
    assert not ops.names & {"nonzero", "_local_scalar_dense", "item", "masked_select"}
    _assert_ranked(cls, k, values, index)
    assert index[1, 0].item() == 7 * 90 + 3
    assert index[0].tolist() == list(range(k))  # all tied: the first k by index


@pytest.mark.parametrize("ties", ["all tied", "bf16", "rounded"])
def test_nms_prefix_gives_the_same_detections_as_all_candidates_even_with_ties(ties):
    """The prefix is widened until the output cannot change; with the candidates ranked exactly as a stable sort
    (equal logits by index, also at the prefix's cut), that holds for equal scores too."""
    g = torch.Generator().manual_seed(0)
    a, c = 3000, 5
    cls = {"all tied": torch.full((2, a, c), -4.6),
           "bf16": (torch.randn(2, a, c, generator=g) * 0.5 - 4).bfloat16(),
           "rounded": (torch.randn(2, a, c, generator=g) * 2).round()}[ties]
    xy = torch.rand(a, 2, generator=g) * 300
    anchors = torch.cat([xy, xy + 20 + torch.rand(a, 2, generator=g) * 30], 1)  # overlapping: NMS suppresses
    deltas = torch.zeros(2, a, 4)
    outs = [_post(max_detections=100, nms_prefix=prefix)(cls, deltas, anchors, (1e4, 1e4)) for prefix in (None, 16, 512)]
    for out in outs[1:]:
        for key in outs[0]:
            assert torch.equal(out[key], outs[0][key]), key
    assert outs[0]["num_detections"].tolist() == [100, 100]


def test_topk_of_an_image_does_not_depend_on_its_batch():
    """Each image is ranked on its own: the same rows alone and batched (one with 9,000 equal top logits)."""
    k = 512
    g = torch.Generator().manual_seed(3)
    tied = torch.randn(1, 3000, 90, generator=g) - 10.0
    tied.view(1, -1)[0, torch.randperm(3000 * 90, generator=g)[:9000]] = 5.0  # 9,000 equal top logits
    plain = torch.randn(1, 3000, 90, generator=g)
    alone = [ranked_topk(x, k) for x in (tied, plain)]
    batched = ranked_topk(torch.cat([tied, plain]), k)
    for i, (values, index) in enumerate(alone):
        assert torch.equal(batched[0][i], values[0]) and torch.equal(batched[1][i], index[0])
