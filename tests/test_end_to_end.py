"""End to end on CPU: train a few steps with Lightning on synthetic data, evaluate, and check the files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks.config import compose
from tasks.runner import CheckpointError, evaluate, load_checkpoint_weights, train

ROOT = Path(__file__).resolve().parent.parent
METRIC_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]

# A deliberately tiny model so each run takes seconds on 2 cores.
TINY = [
    "data=synthetic",
    "model.image_size=128",
    "neck.channels=16",
    "neck.num_repeats=1",
    "head.depth=1",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.synthetic.num_train=16",
    "data.synthetic.num_val=8",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]


def _cfg(tmp_path, *extra, name="train"):
    return compose(name, [*TINY, f"cache_dir={tmp_path / 'cache'}", *extra])


@pytest.mark.slow
def test_train_then_eval_writes_valid_coco_outputs(tmp_path):
    run = tmp_path / "run"
    result = train(_cfg(tmp_path, "trainer.max_steps=4", "trainer.max_epochs=1"), run)
    assert (run / "config.yaml").is_file()
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    data = metrics.pop("data")  # what was evaluated
    assert data["format"] == "coco" and data["split"] == "val2017" and data["synthetic"] is True
    assert metrics == result["metrics"]
    per_class = metrics.pop("per_class")  # AP, AP50 and ground-truth boxes of each synthetic category
    assert list(metrics) == METRIC_KEYS
    assert list(per_class) == ["circle", "square", "triangle", "cross"]
    assert all(set(v) == {"AP", "AP50", "num_gt"} for v in per_class.values())
    assert (run / "logs" / "metrics.csv").is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["effdense_config"]["model"]["image_size"] == 128  # self-describing checkpoint

    # Evaluate the checkpoint separately: same numbers, and they equal pycocotools run directly.
    eval_dir = tmp_path / "eval"
    cfg = _cfg(tmp_path, f"ckpt={last}", name="eval")
    metrics2 = evaluate(cfg, eval_dir)
    assert list(metrics2) == [*METRIC_KEYS, "per_class"]
    preds = json.loads((eval_dir / "predictions.json").read_text())
    assert preds, "an untrained model still returns its top-100 detections per image"
    data_dir = next((tmp_path / "cache").glob("synthetic_coco/*"))
    gt = COCO(str(data_dir / "annotations" / "instances_val2017.json"))
    assert {p["image_id"] for p in preds} <= set(gt.getImgIds())
    assert {p["category_id"] for p in preds} <= set(gt.getCatIds())
    for p in preds[:50]:
        x, y, w, h = p["bbox"]
        img = gt.imgs[p["image_id"]]
        assert w >= 0 and h >= 0 and x >= -1e-3 and y >= -1e-3
        assert x + w <= img["width"] + 1e-3 and y + h <= img["height"] + 1e-3
    ev = COCOeval(gt, gt.loadRes(str(eval_dir / "predictions.json")), "bbox")
    ev.params.imgIds = sorted(gt.getImgIds())
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert [metrics2[k] for k in METRIC_KEYS] == pytest.approx(list(ev.stats), abs=1e-12)


@pytest.mark.slow
def test_fast_dev_run_b3_cli(tmp_path):
    """The issue's command, through the real CLI: b3 at its D3 resolution, one step."""
    cmd = [
        sys.executable, str(ROOT / "tools" / "train.py"), "task=detection", "backbone=b3", "data=synthetic",
        "trainer.fast_dev_run=true", "trainer.accelerator=cpu", "data.batch_size=1", "data.num_workers=0",
        "data.synthetic.num_train=4", "data.synthetic.num_val=2", "model.image_size=256",
        f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_missing_coco_fails_with_one_clear_line(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "tools" / "train.py"), "task=detection", "backbone=b3",
        f"data_root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert str(tmp_path / "nowhere" / "coco") in err
    assert "data.root" in err and "data=synthetic" in err


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    from hydra.utils import instantiate

    small = instantiate(compose("train", ["neck.channels=16", "neck.num_repeats=1", "data.num_classes=3"]).model)
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in small.state_dict().items()}}, path)
    other = instantiate(compose("train", ["neck.channels=24", "neck.num_repeats=1", "data.num_classes=3"]).model)
    with pytest.raises(CheckpointError, match="other.ckpt") as err:
        load_checkpoint_weights(other, path)
    assert "shape" in str(err.value)
    load_checkpoint_weights(small, path)  # the right model loads
