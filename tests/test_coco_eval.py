"""CocoEvaluator: exact agreement with the COCO evaluation run directly, conversion, padding, dedup, writes."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.errors import DatasetError
from evaluation.coco import METRIC_NAMES, CocoEvaluator
from evaluation.coco_results import EvalPayload, merge_payloads
from utils.files import atomic_write_json

KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]

# Non-crowd ground truth: (annotation id, image id, category id, [x, y, w, h]); areas are w * h.
GT_BOXES = [
    (1, 1, 1, [10.0, 20.0, 20.0, 30.0]),  # small (600)
    (2, 1, 5, [100.0, 50.0, 80.0, 60.0]),  # medium (4800)
    (3, 2, 90, [0.0, 0.0, 150.0, 100.0]),  # large (15000), touching the border
    (4, 2, 1, [200.0, 100.0, 50.0, 60.0]),  # medium (3000)
]
CROWD_BOX = [400.0, 300.0, 100.0, 60.0]  # crowd annotation on image 1, category 1


def _gt_dataset() -> dict:
    crowd_mask = np.zeros((480, 640), dtype=np.uint8)
    crowd_mask[300:360, 400:500] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd_mask))
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        {"id": aid, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
         "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3],
                           box[0], box[1] + box[3]]]}
        for aid, img, cat, box in GT_BOXES
    ]
    anns.append({"id": 5, "image_id": 1, "category_id": 1, "bbox": CROWD_BOX,
                 "area": float(mask_utils.area(rle)), "iscrowd": 1, "segmentation": rle})
    return {
        "info": {"description": "coco_eval test"},
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
            {"id": 2, "file_name": "b.jpg", "width": 320, "height": 240},
            {"id": 3, "file_name": "c.jpg", "width": 100, "height": 100},  # no annotations
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"},
                       {"id": 90, "name": "toothbrush"}],
        "annotations": anns,
    }


@pytest.fixture
def gt_path(tmp_path) -> Path:
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(_gt_dataset()))
    return path


@pytest.fixture
def gt(gt_path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt_path))


def _batch(per_image: dict[int, list[tuple[list[float], float, int]]], pad_to: int | None = None) -> dict:
    """Padded update() arguments from {image_id: [(xyxy, score, category_id), ...]}; padding is garbage."""
    ids = sorted(per_image)
    d = max([len(v) for v in per_image.values()] + [pad_to or 0, 1])
    boxes = torch.full((len(ids), d, 4), 1.0e4)
    boxes[..., 2:] = 2.0e4
    scores = torch.full((len(ids), d), 0.99)
    cats = torch.ones((len(ids), d), dtype=torch.long)  # a real category: padding must be skipped by count
    num = torch.zeros(len(ids), dtype=torch.long)
    for b, img in enumerate(ids):
        for j, (xyxy, score, cat) in enumerate(per_image[img]):
            boxes[b, j] = torch.tensor(xyxy)
            scores[b, j] = score
            cats[b, j] = cat
        num[b] = len(per_image[img])
    return {"image_ids": torch.tensor(ids), "boxes": boxes, "scores": scores, "category_ids": cats,
            "num_detections": num}


def _xyxy(box: list[float]) -> list[float]:
    return [box[0], box[1], box[0] + box[2], box[1] + box[3]]


def _perfect() -> dict[int, list]:
    dets: dict[int, list] = {1: [], 2: [], 3: []}
    for _, img, cat, box in GT_BOXES:
        dets[img].append((_xyxy(box), 0.9, cat))
    dets[1].append((_xyxy(CROWD_BOX), 0.8, 1))  # lands on the crowd region: ignored, not a false positive
    return dets


def _noisy(seed: int = 0) -> dict[int, list]:
    """Jittered true boxes, wrong classes, false positives, a crowd hit; float32-exact coordinates."""
    g = torch.Generator().manual_seed(seed)
    dets: dict[int, list] = {1: [], 2: [], 3: []}
    for _, img, cat, box in GT_BOXES:
        for k in range(3):
            jitter = (torch.rand(4, generator=g) - 0.5) * (0.15 * k + 0.05) * box[2]
            xyxy = (torch.tensor(_xyxy(box)) + jitter).tolist()
            wrong = k == 2 and cat != 90
            dets[img].append((xyxy, float(torch.rand((), generator=g)), 90 if wrong else cat))
    for img, (w, h) in {1: (640, 480), 2: (320, 240), 3: (100, 100)}.items():
        for _ in range(4):
            u = torch.rand(5, generator=g).tolist()
            x, y, bw, bh = u[0] * w * 0.7, u[1] * h * 0.7, 5 + u[2] * w * 0.3, 5 + u[3] * h * 0.3
            cat = [1, 5, 90][int(torch.randint(0, 3, (), generator=g))]
            dets[img].append(([x, y, x + bw, y + bh], u[4], cat))
    dets[1].append((_xyxy(CROWD_BOX), 0.95, 1))
    return dets


def _stats_direct(gt_path: Path, predictions: Path, img_ids: list[int]) -> list[float]:
    """The 12 numbers from the COCO evaluation run by hand on a written results file."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(predictions)), iouType="bbox")
        ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


def _evaluate(gt, dets: dict[int, list], **kw) -> tuple[CocoEvaluator, dict[str, float]]:
    ev = CocoEvaluator(gt, **kw)
    ev.update(**_batch(dets))
    return ev, ev.compute()


def test_perfect_predictions_give_ap_one(gt):
    ev, metrics = _evaluate(gt, _perfect())
    assert list(metrics) == KEYS == list(METRIC_NAMES)
    assert all(type(v) is float for v in metrics.values())
    # Every area range has ground truth here; means over categories may round to 1 - 2e-16.
    assert metrics == pytest.approx({k: 1.0 for k in KEYS}, abs=1e-12)
    lines = ev.summary.splitlines()
    assert len(lines) == 12
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000")
    assert lines[-1].startswith(" Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]")


@pytest.mark.parametrize("images", [(1, 2, 3), (2,), (1, 3)])
def test_metrics_equal_direct_evaluation(gt, gt_path, tmp_path, images):
    dets = {k: v for k, v in _noisy().items() if k in images}
    ev, metrics = _evaluate(gt, dets)
    pred = ev.write_predictions(tmp_path / "out" / "predictions.json")
    direct = _stats_direct(gt_path, pred, list(images))
    assert [metrics[k] for k in KEYS] == direct
    assert 0.0 < metrics["AP50"] < 1.0
    if images == (2,):  # no small ground truth on image 2: the evaluation reports -1
        assert metrics["APs"] == -1.0 and metrics["ARs"] == -1.0


def test_image_with_zero_detections_still_counts(gt):
    dets = {1: [(_xyxy(box), 0.9, cat) for _, img, cat, box in GT_BOXES if img == 1], 2: []}
    _, metrics = _evaluate(gt, dets)
    # Per category: person found 1 of 2 (precision 1 up to recall 0.5: 51 of 101 recall thresholds),
    # airplane 1 of 1, toothbrush 0 of 1.
    assert metrics["AP"] == pytest.approx((51 / 101 + 1.0 + 0.0) / 3)
    assert metrics["AR100"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # Without image 2 the same detections are perfect.
    _, only_1 = _evaluate(gt, {1: dets[1]})
    assert only_1["AP"] == pytest.approx(1.0, abs=1e-12)


def test_xyxy_to_xywh_and_padding_skipped(gt):
    ev = CocoEvaluator(gt)
    boxes = torch.tensor([
        [[10.5, 20.25, 30.75, 50.5], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 8.0, 8.0], [5.0, 5.0, 9.0, 9.0]],
        [[100.0, 50.0, 180.0, 110.0], [7.0, 7.0, 9.0, 9.0], [1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0]],
    ])
    scores = torch.tensor([[0.75, 0.5, 0.25, 0.125], [0.625, 0.9, 0.9, 0.9]])
    cats = torch.tensor([[1, -1, 90, 5], [5, 1, 1, 1]])
    ev.update(image_ids=[1, 2], boxes=boxes, scores=scores, category_ids=cats,
              num_detections=torch.tensor([3, 1]))
    res = ev.results()
    assert res == [
        {"image_id": 1, "category_id": 1, "bbox": [10.5, 20.25, 20.25, 30.25], "score": 0.75},
        {"image_id": 1, "category_id": 90, "bbox": [0.0, 0.0, 8.0, 8.0], "score": 0.25},
        {"image_id": 2, "category_id": 5, "bbox": [100.0, 50.0, 80.0, 60.0], "score": 0.625},
    ]
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int and type(r["score"]) is float
               and all(type(v) is float for v in r["bbox"]) for r in res)
    # Without num_detections only the negative category marks padding.
    ev2 = CocoEvaluator(gt)
    ev2.update(image_ids=torch.tensor([1, 2]), boxes=boxes, scores=scores, category_ids=cats)
    assert len(ev2.results()) == 7


def test_full_precision_kept(gt):
    ev = CocoEvaluator(gt)
    box = torch.tensor([[[10.1, 20.2, 30.3, 40.4]]])  # float32
    ev.update(image_ids=[1], boxes=box, scores=torch.tensor([[0.3]]), category_ids=torch.tensor([[1]]))
    (r,) = ev.results()
    b64 = box.double()[0, 0].tolist()
    assert r["bbox"] == [b64[0], b64[1], b64[2] - b64[0], b64[3] - b64[1]]
    assert r["score"] == float(torch.tensor(0.3).double())


def test_empty_predictions(gt):
    ev = CocoEvaluator(gt)
    ev.update(**_batch({1: [], 2: [], 3: []}))
    metrics = ev.compute()
    assert metrics == {k: 0.0 for k in KEYS}
    assert len(ev.summary.splitlines()) == 12
    # Image 2 alone has no small ground truth: those two numbers are -1, the rest 0.
    ev.reset()
    ev.update(image_ids=[2], boxes=torch.zeros(1, 0, 4), scores=torch.zeros(1, 0),
              category_ids=torch.zeros(1, 0, dtype=torch.long))
    metrics = ev.compute()
    assert metrics == {k: (-1.0 if k in ("APs", "ARs") else 0.0) for k in KEYS}
    assert "= -1.000" in ev.summary
    assert ev.results() == []


def test_merge_payloads_counts_repeated_images_once(gt):
    dets = _noisy(seed=1)
    _, single = _evaluate(gt, dets)
    # Two ranks; the second repeats image 1 (the padding a distributed sampler adds).
    rank0, rank1 = CocoEvaluator(gt), CocoEvaluator(gt)
    rank0.update(**_batch({1: dets[1], 2: dets[2]}))
    rank1.update(**_batch({3: dets[3]}))
    rank1.update(**_batch({1: dets[1][:2]}))  # a different copy: only rank 0's must survive
    merged = merge_payloads([rank0.payload(), rank1.payload()])
    assert merged.image_ids.tolist() == [1, 2, 3]
    assert merged.num_detections == sum(len(v) for v in dets.values())
    ev = CocoEvaluator(gt)
    ev.load_payload(merged)
    assert ev.compute() == single
    # Merging is idempotent: every rank re-merging identical payloads changes nothing.
    again = merge_payloads([merged, merged])
    for field in ("image_ids", "occurrence", "boxes", "scores", "category_ids"):
        np.testing.assert_array_equal(getattr(again, field), getattr(merged, field))
    # Without de-duplication the repeated detections would count twice and change the result.
    doubled = CocoEvaluator(gt)
    doubled.update(**_batch(dets))
    doubled.update(**_batch({1: dets[1]}))
    assert len(doubled.results()) == merged.num_detections  # still counted once within a rank
    assert doubled.compute() == single


def test_merge_payloads_empty_and_zero_detection_ranks():
    empty = EvalPayload.empty()
    assert merge_payloads([]).image_ids.size == 0
    p = EvalPayload(image_ids=np.array([7, 3]), occurrence=np.array([1, 1, 0]),
                    boxes=np.arange(12, dtype=np.float64).reshape(3, 4), scores=np.array([0.1, 0.2, 0.3]),
                    category_ids=np.array([1, 5, 90]))
    m = merge_payloads([empty, EvalPayload(image_ids=np.array([3]), occurrence=np.zeros(0, np.int64),
                                           boxes=np.zeros((0, 4)), scores=np.zeros(0),
                                           category_ids=np.zeros(0, np.int64)), p])
    # Image 3 is first seen (with no detections) on the second rank, so the third rank's copy is dropped.
    assert m.image_ids.tolist() == [3, 7]
    assert m.detection_image_ids().tolist() == [7]
    assert m.scores.tolist() == [0.3]
    assert m.boxes.tolist() == [[8.0, 9.0, 10.0, 11.0]]


def test_gt_from_path_and_errors(gt, gt_path, tmp_path):
    for source in (gt_path, str(gt_path)):
        _, metrics = _evaluate(source, _perfect())
        assert metrics["AP"] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoEvaluator(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json"):
        CocoEvaluator(bad)
    with pytest.raises(ValueError, match="backend"):
        CocoEvaluator(gt, backend="nope")
    ev = CocoEvaluator(gt)
    with pytest.raises(RuntimeError, match="before any update"):
        ev.compute()
    with pytest.raises(ValueError, match=r"image ids not in the ground truth: \[42\]"):
        ev.update(**_batch({42: []}))
    with pytest.raises(ValueError, match=r"category ids not in the ground truth: \[2\]"):
        ev.update(**_batch({1: [([0.0, 0.0, 5.0, 5.0], 0.5, 2)]}))
    with pytest.raises(ValueError, match="non-finite"):
        ev.update(**_batch({1: [([0.0, 0.0, float("nan"), 5.0], 0.5, 1)]}))
    with pytest.raises(ValueError, match="scores must have shape"):
        ev.update(image_ids=[1], boxes=torch.zeros(1, 2, 4), scores=torch.zeros(1, 3),
                  category_ids=torch.zeros(1, 2, dtype=torch.long))
    assert ev.payload().image_ids.size == 0  # failed updates leave nothing behind


def test_atomic_write_keeps_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"AP": 0.5})
    assert json.loads(path.read_text()) == {"AP": 0.5}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"AP": 0.7, "x": [1, 2, object()]})  # fails after part was written
    with pytest.raises(ValueError):
        atomic_write_json(path, {"AP": math.nan})
    assert json.loads(path.read_text()) == {"AP": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary files left
    CocoEvaluator.write_metrics(path, {"AP": np.float64(0.25)})
    assert json.loads(path.read_text()) == {"AP": 0.25}


def test_faster_coco_eval_backend_matches(gt):
    pytest.importorskip("faster_coco_eval")
    for dets in (_noisy(), _noisy(seed=3), {2: _noisy()[2]}, {1: [], 2: []}):
        ref, ref_metrics = _evaluate(gt, dets)
        fast, fast_metrics = _evaluate(gt, dets, backend="faster_coco_eval")
        # Same numbers up to the last bit of floating-point summation order.
        assert fast_metrics == pytest.approx(ref_metrics, abs=1e-12)
        assert fast.summary == ref.summary


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("change", ["ids_from_0", "repeated_ids", "no_area_no_iscrowd"])
def test_annotation_files_of_other_tools_evaluate_alike(tmp_path, gt_path, backend, change):
    """Annotation ids counted from 0 or repeated (pycocotools would never match a box of id 0, nor one of two that
    share an id), and files without area and iscrowd (pycocotools reads both): the same 12 numbers as the file
    written as COCO writes it."""
    data = _gt_dataset()
    for n, ann in enumerate(data["annotations"]):
        if change == "ids_from_0":
            ann["id"] = n
        elif change == "repeated_ids":
            ann["id"] = 7
        elif not ann["iscrowd"]:  # the crowd region keeps its area (its mask's), which no box gives
            del ann["area"], ann["iscrowd"]
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    expected = _evaluate(str(gt_path), _noisy(), backend=backend)[1]
    assert _evaluate(str(path), _noisy(), backend=backend)[1] == expected
    assert _evaluate(str(path), _perfect(), backend=backend)[1]["AP"] == 1.0
