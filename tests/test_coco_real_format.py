"""A real COCO-format annotation file (80 categories with ids 1..90 and gaps, crowd RLE, empty images)
trains and evaluates with the 90-class label space, and the metrics equal pycocotools."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from coco_categories import COCO_CATEGORIES
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks.config import compose
from tasks.runner import evaluate, train

KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
REMAP_TO = [1, 18, 62, 90]  # person, dog, chair, toothbrush: spread over the gapped id range


def _coco_like(src: Path, dst: Path) -> Path:
    """Re-label the synthetic dataset with real COCO categories, keeping its images, crowds and empty images."""
    (dst / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        os.symlink(src / split, dst / split)
        data = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        old_ids = sorted(c["id"] for c in data["categories"])
        remap = dict(zip(old_ids, REMAP_TO))
        for ann in data["annotations"]:
            ann["category_id"] = remap[ann["category_id"]]
        data["categories"] = [{"id": i, "name": n, "supercategory": "thing"} for i, n in COCO_CATEGORIES]
        (dst / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return dst


@pytest.mark.slow
def test_real_format_trains_and_evaluates(synthetic_coco, tmp_path):
    root = _coco_like(synthetic_coco, tmp_path / "coco")
    gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    assert any(a["iscrowd"] for a in gt.dataset["annotations"]) or any(
        a["iscrowd"] for a in json.loads((root / "annotations" / "instances_train2017.json").read_text())["annotations"]
    )
    assert any(not gt.getAnnIds(imgIds=[i]) for i in gt.getImgIds()), "needs an image without annotations"

    common = [
        f"data.root={root}", "data.num_classes=90", "model.image_size=128", "neck.channels=16",
        "neck.num_repeats=1", "head.depth=1", "data.batch_size=4", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    ]
    run = tmp_path / "run"
    train(compose("train", [*common, "trainer.max_steps=2", "eval_after_train=false"]), run)
    metrics = evaluate(compose("eval", [*common, f"ckpt={run / 'checkpoints' / 'last.ckpt'}"]), tmp_path / "eval")

    preds = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert preds and {p["category_id"] for p in preds} <= set(range(1, 91))
    assert {p["image_id"] for p in preds} <= set(gt.getImgIds())
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "eval" / "predictions.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert [metrics[k] for k in KEYS] == pytest.approx(list(ev.stats), abs=1e-12)
