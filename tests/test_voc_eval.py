"""Pascal VOC mAP (evaluation.voc): hand-made detections with answers worked out by hand, an independent
implementation of the devkit's rules on a random case, the COCO numbers kept beside it, and two gloo processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gloo_processes import run_on_two_processes
from voc_reference import devkit_ap

from datasets.coco_annotations import make_coco
from evaluation.coco import METRIC_NAMES, CocoEvaluator
from evaluation.voc import VocEvaluator, voc_ap

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]


def _gt(images: dict[int, list[tuple]]) -> dict:
    """``images``: image id -> [(category id, x0, y0, x1, y1, difficult)] in continuous pixels."""
    anns = []
    for img, rows in images.items():
        for cat, x0, y0, x1, y1, difficult in rows:
            w, h = x1 - x0, y1 - y0
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "bbox": [x0, y0, w, h],
                         "area": w * h, "iscrowd": difficult, "difficult": difficult})
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 100, "width": 100} for i in images],
            "annotations": anns, "categories": CATS}


def _evaluate(gt: dict, dets: dict[int, list[tuple]], cls=VocEvaluator):
    """``dets``: image id -> [(category id, x0, y0, x1, y1, score)]."""
    ev = cls(make_coco(gt))
    for img in gt["images"]:
        rows = dets.get(img["id"], [])
        d = max(len(rows), 1)
        boxes, scores, cats = torch.zeros(1, d, 4), torch.zeros(1, d), torch.full((1, d), -1)
        for k, (cat, *box, score) in enumerate(rows):
            boxes[0, k] = torch.tensor(box, dtype=torch.float64)
            scores[0, k], cats[0, k] = score, cat
        ev.update(image_ids=[img["id"]], boxes=boxes, scores=scores, category_ids=cats)
    return ev, ev.compute()


SQUARE = (10.0, 10.0, 30.0, 30.0)
OTHER = (60.0, 60.0, 80.0, 80.0)
FAR = (40.0, 0.0, 50.0, 8.0)


def test_eleven_point_and_area_differ_as_worked_out():
    # Two boxes; detections TP (0.9), FP (0.8), TP (0.7): recall 0.5, 0.5, 1; precision 1, 0.5, 2/3.
    gt = _gt({1: [(1, *SQUARE, 0), (1, *OTHER, 0)]})
    dets = {1: [(1, *SQUARE, 0.9), (1, *FAR, 0.8), (1, *OTHER, 0.7)]}
    ev, m = _evaluate(gt, dets)
    # Area: 0.5 * 1 + 0.5 * 2/3. 11-point: precision 1 at r = 0..0.5 (6 points), 2/3 at r = 0.6..1 (5 points).
    assert m["VOC_AP50"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert m["VOC07_AP50"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)
    assert list(m)[: len(METRIC_NAMES)] == list(METRIC_NAMES)  # COCO's 12 first, unchanged
    _, coco = _evaluate(gt, dets, cls=CocoEvaluator)
    assert {k: m[k] for k in METRIC_NAMES} == coco
    assert "VOC2007 11-point" in ev.summary and "VOC2010+ area" in ev.summary
    assert ev.voc_per_class["cat"]["num_gt"] == 2 and math.isnan(ev.voc_per_class["dog"]["VOC_AP50"])
    # The VOC APs join the per-class table of COCO's numbers: None (n/a) for a class without boxes.
    assert ev.per_class["cat"]["VOC07_AP50"] == pytest.approx(m["VOC07_AP50"], abs=1e-12)
    assert ev.per_class["dog"]["VOC_AP50"] is None and ev.per_class["cat"]["num_gt"] == 2
    header = ev.per_class_table.splitlines()[0]
    assert "VOC07_AP50 (%)" in header and "VOC_AP50 (%)" in header


def test_a_detection_on_a_difficult_box_is_neither_true_nor_false():
    gt = _gt({1: [(1, *SQUARE, 1), (1, *OTHER, 0)]})
    # The top detection hits the difficult box: ignored, so the only counted one is a true positive.
    _, m = _evaluate(gt, {1: [(1, *SQUARE, 0.9), (1, *OTHER, 0.8)]})
    assert m["VOC_AP50"] == m["VOC07_AP50"] == 1.0
    # Missing the difficult box costs nothing; missing the other one costs everything.
    _, m = _evaluate(gt, {1: [(1, *SQUARE, 0.9)]})
    assert m["VOC_AP50"] == m["VOC07_AP50"] == 0.0


def test_a_second_detection_of_a_box_is_a_false_positive_even_if_another_box_overlaps():
    # VOC's greedy rule: the detection goes to the box it overlaps most (IoU 0.905, already detected), not to the
    # second box it also overlaps at 0.739. Recall 0.5, 0.5; precision 1, 0.5.
    gt = _gt({1: [(1, 0.0, 0.0, 10.0, 10.0, 0), (1, 2.0, 0.0, 12.0, 10.0, 0)]})
    _, m = _evaluate(gt, {1: [(1, 0.0, 0.0, 10.0, 10.0, 0.9), (1, 0.5, 0.0, 10.5, 10.0, 0.8)]})
    assert m["VOC_AP50"] == pytest.approx(0.5, abs=1e-12)
    assert m["VOC07_AP50"] == pytest.approx(6 / 11, abs=1e-12)


def test_the_mean_counts_only_classes_with_a_non_difficult_box():
    gt = _gt({
        1: [(1, *SQUARE, 0), (2, *OTHER, 1)],  # dog: only a difficult box
        2: [(1, *OTHER, 0)],
    })
    dets = {1: [(1, *SQUARE, 0.9), (3, *FAR, 0.95)], 2: [(1, *FAR, 0.8), (1, *OTHER, 0.7)]}
    ev, m = _evaluate(gt, dets)
    # cat: TP, FP, TP -> recall 0.5, 0.5, 1, precision 1, 0.5, 2/3, as in the first case; dog and bird have no
    # counted box (bird's detection is simply unmatched), so the mean is cat's AP.
    assert m["VOC_AP50"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert m["VOC07_AP50"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)
    assert ev.voc_per_class["dog"]["num_gt"] == 0 and ev.voc_per_class["bird"]["num_gt"] == 0
    # No counted box anywhere: undefined, -1 as COCO's.
    _, m = _evaluate(_gt({1: [(2, *OTHER, 1)]}), {1: [(2, *OTHER, 0.5)]})
    assert m["VOC_AP50"] == m["VOC07_AP50"] == -1.0


def test_voc_ap_rules_on_curves():
    assert voc_ap(np.array([]), np.array([]), eleven_point=True) == 0.0
    assert voc_ap(np.array([]), np.array([]), eleven_point=False) == 0.0
    # Recall 0.3 exactly reaches the 0.3 point (k / 10, not a sum of 0.1 steps).
    assert voc_ap(np.array([0.3]), np.array([1.0]), eleven_point=True) == pytest.approx(4 / 11)
    # A dip is lifted by the envelope: 0.2 * 1 + 0.4 * 0.8 = 0.52 (the 0.5 at recall 0.4 becomes 0.8; without the
    # envelope it would be 0.2 + 0.1 + 0.16 = 0.46).
    assert voc_ap(np.array([0.2, 0.4, 0.6]), np.array([1.0, 0.5, 0.8]), eleven_point=False) == pytest.approx(0.52)


def _random_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    images, dets = {}, {}
    for img in range(1, 13):
        rows, found = [], []
        for _ in range(int(rng.integers(0, 5))):
            x0, y0 = (float(v) for v in rng.integers(0, 70, 2))
            x1, y1 = x0 + float(rng.integers(6, 30)), y0 + float(rng.integers(6, 30))
            cat, difficult = int(rng.integers(1, 4)), int(rng.random() < 0.2)
            rows.append((cat, x0, y0, x1, y1, difficult))
            for _ in range(int(rng.integers(0, 3))):  # jittered detections: hits, near misses, duplicates
                j = rng.normal(0, 3, 4)
                found.append((cat if rng.random() < 0.85 else int(rng.integers(1, 4)), x0 + j[0], y0 + j[1],
                              max(x1 + j[2], x0 + j[0] + 1), max(y1 + j[3], y0 + j[1] + 1), float(rng.random())))
        for _ in range(int(rng.integers(0, 3))):  # background detections
            x0, y0 = (float(v) for v in rng.integers(0, 80, 2))
            found.append((int(rng.integers(1, 4)), x0, y0, x0 + 15, y0 + 12, float(rng.random())))
        images[img], dets[img] = rows, found
    return _gt(images), dets


def test_equals_an_independent_devkit_computation():
    for seed in range(3):
        gt, dets = _random_case(seed)
        _, m = _evaluate(gt, dets)
        assert 0.0 < m["VOC_AP50"] < 1.0
        assert m["VOC07_AP50"] == pytest.approx(devkit_ap(gt, dets, eleven_point=True), abs=1e-6)
        assert m["VOC_AP50"] == pytest.approx(devkit_ap(gt, dets, eleven_point=False), abs=1e-6)


def _half_on(rank: int) -> dict:
    """Each of two gloo processes evaluates half of the random case's images."""
    gt, dets = _random_case(1)
    keep = {i for i in dets if i % 2 == rank}
    ev = VocEvaluator(make_coco(gt))
    for img in sorted(keep):
        rows = dets[img] or [(-1, 0.0, 0.0, 1.0, 1.0, 0.0)]
        ev.update(image_ids=[img], boxes=torch.tensor([[r[1:5] for r in rows]], dtype=torch.float64),
                  scores=torch.tensor([[r[5] for r in rows]]), category_ids=torch.tensor([[r[0] for r in rows]]))
    return ev.compute()


def test_two_processes_give_the_numbers_of_one():
    gt, dets = _random_case(1)
    _, single = _evaluate(gt, dets)
    for metrics in run_on_two_processes(_half_on):
        assert metrics == pytest.approx(single, abs=1e-12)
