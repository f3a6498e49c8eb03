"""Segmentation end to end on CPU: Lightning training on the synthetic Cityscapes folder, evaluation, the
official-format prediction PNGs, equality with the official Cityscapes evaluation, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets import CITYSCAPES_CLASSES, VALID_LABEL_IDS
from tasks.config import compose
from tasks.runner import evaluate, train

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "task=segmentation",
    "data=synthetic",
    "neck.channels=16",
    "neck.num_repeats=1",
    "head.depth=1",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.synthetic.num_train=4",
    "data.synthetic.num_val=3",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]


def _cfg(tmp_path, *extra, name="train"):
    return compose(name, [*TINY, f"cache_dir={tmp_path / 'cache'}", *extra])


def official_cityscapes_miou(data_dir: Path, prediction_dir: Path) -> tuple[float, dict[str, float]]:
    """Run the official cityscapesscripts pixel-level evaluation on ``prediction_dir`` against
    ``data_dir/gtFine/val``; returns its class-average IoU and per-class IoUs."""
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as official

    if not hasattr(np, "in1d"):  # cityscapesscripts 2.3.0 calls np.in1d, removed in numpy 2.4
        np.in1d = np.isin
    args = official.args
    args.predictionPath = str(prediction_dir)
    args.predictionWalk = None
    args.evalInstLevelScore = False  # needs instance-id ground truth, which is not part of this check
    args.JSONOutput = False
    args.quiet = True
    gt_files = sorted(str(p) for p in (data_dir / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    pred_files = [official.getPrediction(args, gt) for gt in gt_files]
    results = official.evaluateImgLists(pred_files, gt_files, args)
    per_class = {k: v for k, v in results["classScores"].items() if k in CITYSCAPES_CLASSES}
    return float(results["averageScoreClasses"]), per_class


@pytest.mark.slow
def test_train_eval_and_official_cityscapes_evaluation_agree(tmp_path):
    run = tmp_path / "run"
    result = train(_cfg(tmp_path, "trainer.max_steps=3", "trainer.max_epochs=1", "data.overlays=true"), run)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"mIoU", "IoU"} and list(metrics["IoU"]) == list(CITYSCAPES_CLASSES)
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["mIoU"] == pytest.approx(result["metrics"]["mIoU"])

    data_dir = next((tmp_path / "cache").glob("synthetic_cityscapes/*"))
    gt_files = sorted((data_dir / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    preds = sorted((run / "predictions").glob("*.png"))
    assert len(preds) == len(gt_files) == 3
    for gt, pred in zip(gt_files, preds):
        stem = gt.name.removesuffix("_gtFine_labelIds.png")
        assert pred.name == f"{stem}_leftImg8bit.png"  # what the official script matches: {city}_{seq}_{frame}*.png
        p = cv2.imread(str(pred), cv2.IMREAD_UNCHANGED)
        g = cv2.imread(str(gt), cv2.IMREAD_UNCHANGED)
        assert p.dtype == np.uint8 and p.shape == g.shape  # label ids at full resolution
        assert VALID_LABEL_IDS[p].all() and 255 not in p
    assert len(list((run / "overlays").glob("*.jpg"))) == 3
    assert not list((run / "predictions").glob(".*"))  # no temporary files left

    official, per_class = official_cityscapes_miou(data_dir, run / "predictions")
    assert metrics["mIoU"] == pytest.approx(official, abs=1e-9)
    for name, iou in metrics["IoU"].items():
        if iou is None:
            assert np.isnan(per_class[name])
        else:
            assert iou == pytest.approx(per_class[name], abs=1e-9)

    # tools/eval.py's runner on the checkpoint: the same numbers, predictions under the eval run dir.
    eval_dir = tmp_path / "eval"
    metrics2 = evaluate(_cfg(tmp_path, f"ckpt={run / 'checkpoints' / 'last.ckpt'}", name="eval"), eval_dir)
    assert len(list((eval_dir / "predictions").glob("*.png"))) == 3
    official2, _ = official_cityscapes_miou(data_dir, eval_dir / "predictions")
    assert metrics2["mIoU"] == pytest.approx(official2, abs=1e-9)


@pytest.mark.slow
def test_sliding_window_inference_matches_whole_image_shapes(tmp_path):
    run = tmp_path / "run"
    train(_cfg(tmp_path, "trainer.max_steps=1", "trainer.max_epochs=1", "eval_after_train=false"), run)
    metrics = evaluate(
        _cfg(
            tmp_path,
            f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
            "task.module.inference=slide",
            "task.module.slide_crop=[128,128]",
            "task.module.slide_stride=[128,96]",
            name="eval",
        ),
        tmp_path / "eval",
    )
    assert 0.0 <= metrics["mIoU"] <= 1.0
    official, _ = official_cityscapes_miou(
        next((tmp_path / "cache").glob("synthetic_cityscapes/*")), tmp_path / "eval" / "predictions"
    )
    assert metrics["mIoU"] == pytest.approx(official, abs=1e-9)


def _cli(tmp_path, *args):
    env = {**os.environ, "EFFDENSE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_fast_dev_run_cli(tmp_path):
    """The issue's command through the real CLI."""
    proc = _cli(
        tmp_path,
        "task=segmentation",
        "backbone=b0",
        "data=synthetic",
        "trainer.fast_dev_run=true",
        "trainer.accelerator=cpu",
        "data.num_workers=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_missing_cityscapes_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = _cli(tmp_path, "task=segmentation", "backbone=b0", f"data_root={missing}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(missing / "cityscapes" / "leftImg8bit" / "train") in lines[0]
    assert "data=synthetic" in lines[0]


def _write_folder_dataset(root: Path) -> None:
    """Images and single-channel class-index masks (3 classes, 99 = not labelled) in the generic layout."""
    rng = np.random.default_rng(0)
    colours = np.array([[30, 30, 30], [200, 60, 60], [60, 60, 200]], dtype=np.uint8)
    for split, n in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((96, 160), dtype=np.uint8)
            x = int(rng.integers(10, 90))
            mask[:, x : x + 40] = 1
            mask[60:, :] = 2
            mask[:4, :] = 99
            image = colours[np.minimum(mask, 2)] + rng.integers(0, 20, (96, 160, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / split / f"img{i}.jpg"), image[:, :, ::-1])
            cv2.imwrite(str(root / "masks" / split / f"img{i}.png"), mask)


@pytest.mark.slow
def test_generic_folder_trains_and_writes_class_index_pngs(tmp_path):
    root = tmp_path / "mydata"
    _write_folder_dataset(root)
    overrides = [
        "task=segmentation",
        "data=folder",
        f"data.root={root}",
        "data.class_names=[background,pole,ground]",
        "data.ignore_index=99",
        "data.crop_size=[96,128]",
        "data.batch_size=2",
        "data.num_workers=0",
        "neck.channels=16",
        "neck.num_repeats=1",
        "head.depth=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.max_steps=2",
        "trainer.max_epochs=1",
    ]
    run = tmp_path / "run"
    result = train(compose("train", overrides), run)
    assert list(result["metrics"]["IoU"]) == ["background", "pole", "ground"]
    preds = sorted((run / "predictions").glob("*.png"))
    assert [p.name for p in preds] == ["img0.png", "img1.png"]
    for p in preds:
        pred = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert pred.shape == (96, 160) and pred.max() <= 2
