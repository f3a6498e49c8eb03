"""Per-class results: each category's AP and AP50 equal the COCO evaluation run on that category alone (both
backends), categories without ground truth are None, and both tasks print the same table layout."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from evaluation.coco import CocoEvaluator
from evaluation.miou import ConfusionMatrix, format_iou_table

# Five categories: ids with gaps, "unseen" has no ground truth at all, "crowded" only a crowd box, "rare" is only on
# image 4 (left out of one evaluation below).
CATEGORIES = [(1, "person"), (3, "car"), (7, "unseen"), (8, "crowded"), (12, "rare")]


def _ground_truth(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images, anns, aid = [], [], 0
    for img in range(1, 7):
        images.append({"id": img, "file_name": f"{img}.jpg", "width": 320, "height": 240})
        for cat in ((1, 3) if img != 4 else (1, 3, 12)):
            for _ in range(int(rng.integers(0, 4))):
                x, y = rng.uniform(0, 200), rng.uniform(0, 150)
                w, h = rng.uniform(8, 110), rng.uniform(8, 85)
                aid += 1
                anns.append({"id": aid, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                             "iscrowd": 0})
    aid += 1
    anns.append({"id": aid, "image_id": 2, "category_id": 8, "bbox": [10.0, 10.0, 60.0, 40.0], "area": 2400.0,
                 "iscrowd": 1})
    anns.append({"id": aid + 1, "image_id": 4, "category_id": 12, "bbox": [50.0, 60.0, 30.0, 30.0], "area": 900.0,
                 "iscrowd": 0})
    dataset = {"images": images, "annotations": anns,
               "categories": [{"id": i, "name": n} for i, n in CATEGORIES]}
    return dataset


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _detections(gt: COCO, seed: int = 1) -> dict[int, list]:
    """Jittered ground-truth boxes (some with the wrong class) and random false positives of every category."""
    rng = np.random.default_rng(seed)
    dets: dict[int, list] = {i: [] for i in gt.getImgIds()}
    for a in gt.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(2):
            j = rng.normal(0, 0.12, 4) * [w, h, w, h]
            cat = a["category_id"] if rng.random() > 0.2 else int(rng.choice([c for c, _ in CATEGORIES]))
            dets[a["image_id"]].append(([x + j[0], y + j[1], x + w + j[2], y + h + j[3]], float(rng.random()), cat))
    for found in dets.values():
        for cat, _ in CATEGORIES:
            x, y = rng.uniform(0, 250, 2)
            found.append(([x, y, x + rng.uniform(5, 60), y + rng.uniform(5, 60)], float(rng.random()), cat))
    return dets


def _update(ev: CocoEvaluator, dets: dict[int, list]) -> None:
    ids = sorted(dets)
    d = max(len(v) for v in dets.values())
    boxes = torch.zeros((len(ids), d, 4), dtype=torch.float64)
    scores = torch.zeros((len(ids), d), dtype=torch.float64)
    cats = torch.full((len(ids), d), -1, dtype=torch.long)
    for b, img in enumerate(ids):
        for j, (xyxy, score, cat) in enumerate(dets[img]):
            boxes[b, j], scores[b, j], cats[b, j] = torch.tensor(xyxy), score, cat
    ev.update(image_ids=torch.tensor(ids), boxes=boxes, scores=scores, category_ids=cats)


def _alone(gt: COCO, results: list[dict], cat: int, img_ids: list[int]) -> tuple[float, float]:
    """pycocotools run on category ``cat`` alone: (AP, AP50)."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.params.catIds = [cat]
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("images", [(1, 2, 3, 4, 5, 6), (1, 2, 3, 5, 6)])
def test_per_class_ap_equals_the_coco_evaluation_of_each_category_alone(backend, images):
    if backend == "faster_coco_eval":
        pytest.importorskip("faster_coco_eval")
    dataset = _ground_truth()
    gt = _coco(dataset)
    ev = CocoEvaluator(gt, backend=backend)
    _update(ev, {k: v for k, v in _detections(gt).items() if k in images})
    metrics = ev.compute()
    assert list(ev.per_class) == [name for _, name in CATEGORIES]  # category id order, by name
    results = ev.results()
    defined = []
    for cat, name in CATEGORIES:
        ap, ap50 = _alone(gt, results, cat, list(images))
        ours = ev.per_class[name]
        num_gt = sum(1 for a in dataset["annotations"]
                     if a["category_id"] == cat and not a["iscrowd"] and a["image_id"] in images)
        assert ours["num_gt"] == num_gt
        if ap == -1.0:  # COCO's "no ground truth": None here
            assert num_gt == 0 and ours["AP"] is None and ours["AP50"] is None
            continue
        defined.append(ours["AP"])
        if backend == "pycocotools":  # the same evaluation, the same numbers to the last bit
            assert (ours["AP"], ours["AP50"]) == (ap, ap50)
        else:
            assert ours["AP"] == pytest.approx(ap, abs=1e-12) and ours["AP50"] == pytest.approx(ap50, abs=1e-12)
        assert 0.0 < ours["AP50"] < 1.0
    # unseen and crowded never have ground truth; rare only when image 4 is evaluated.
    assert len(defined) == (3 if 4 in images else 2)
    assert metrics["AP"] == pytest.approx(sum(defined) / len(defined), abs=1e-12)  # COCO's AP is their mean
    lines = ev.per_class_table.splitlines()
    assert lines[0].split() == ["class", "AP", "(%)", "AP50", "(%)", "GT", "boxes"]
    unseen = next(line for line in lines if line.startswith("unseen"))
    assert unseen.split() == ["unseen", "n/a", "n/a", "0"]
    person = next(line for line in lines if line.startswith("person"))
    assert person.split()[1] == f"{100 * ev.per_class['person']['AP']:.2f}"
    assert lines[-1].split()[:4] == ["mean", "(AP,", "AP50)", f"{100 * metrics['AP']:.2f}"]


def test_categories_sharing_a_name_stay_apart(tmp_path):
    dataset = _ground_truth()
    dataset["categories"][1]["name"] = "person"
    gt = _coco(dataset)
    ev = CocoEvaluator(gt)
    _update(ev, _detections(gt))
    ev.compute()
    assert list(ev.per_class)[:2] == ["person (id 1)", "person (id 3)"]
    path = CocoEvaluator.write_metrics(tmp_path / "metrics.json", {"AP": np.float64(0.5), "per_class": ev.per_class})
    assert '"unseen": {\n      "AP": null' in path.read_text()


def test_segmentation_per_class_matches_its_iou_map_and_table_layout():
    m = ConfusionMatrix(3, class_names=["road", "car", "sky"])
    m.update(torch.tensor([0, 1, 1, 0, 0, 1]), torch.tensor([0, 1, 0, 255, 0, 1]))
    out = m.compute()
    # road: gt 3 pixels, 2 right; car: gt 2, both right, 1 false positive; sky: never seen nor predicted.
    assert out["per_class"] == {
        "road": {"IoU": 2 / 3, "Acc": 2 / 3, "num_gt_pixels": 3},
        "car": {"IoU": 2 / 3, "Acc": 1.0, "num_gt_pixels": 2},
        "sky": {"IoU": None, "Acc": None, "num_gt_pixels": 0},
    }
    assert out["IoU"] == {name: v["IoU"] for name, v in out["per_class"].items()}  # the earlier key, kept
    lines = format_iou_table(out).splitlines()
    assert lines[0].split() == ["class", "IoU", "(%)", "Acc", "(%)", "GT", "pixels"]
    assert lines[2].split() == ["road", "66.67", "66.67", "3"] and lines[4].split() == ["sky", "n/a", "n/a", "0"]
    assert lines[-2].split() == ["mean", "(mIoU,", "mAcc)", "66.67", "83.33", "5"]
    assert lines[-1].split() == ["all", "pixels", "(aAcc)", "80.00"]
    assert math.isclose(out["aAcc"], 0.8)
