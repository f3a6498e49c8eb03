"""Checkpoints written by earlier code keep loading and give the numbers they gave then.

tests/fixtures/checkpoints holds tiny detection and segmentation checkpoints written before the package layout
changed, with the metrics and predictions that ``tools/eval.py`` gave for them at the time. The config stored in a
checkpoint names classes by ``_target_`` path, so this also checks that those paths still resolve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.checkpoint import merge_checkpoint_config
from tasks.config import compose
from tasks.runner import evaluate

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"


def _eval(tmp_path: Path, kind: str) -> tuple[dict, Path]:
    run = tmp_path / "eval"
    # The synthetic data the fixtures were trained and evaluated on (the same generator and seed), written under
    # tmp_path: the stored config names the folder it was generated in on the machine that wrote the fixtures.
    task = [] if kind == "detection" else ["task=segmentation"]
    data = [*task, "data=synthetic", "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.num_workers=0",
            f"data.batch_size={4 if kind == 'detection' else 2}"]
    cfg = compose("eval", [f"ckpt={FIXTURES / f'{kind}.ckpt'}", f"cache_dir={tmp_path / 'cache'}", *data,
                           "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"])
    return evaluate(cfg, run, overrides=[f"ckpt={FIXTURES / f'{kind}.ckpt'}", *data]), run


@pytest.mark.slow
def test_old_detection_checkpoint_evaluates_and_predicts_as_before(tmp_path):
    metrics, run = _eval(tmp_path, "detection")
    expected = json.loads((FIXTURES / "detection_metrics.json").read_text())
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-6)  # and now per_class too
    before = json.loads((FIXTURES / "detection_predictions.json").read_text())
    after = json.loads((run / "predictions.json").read_text())
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)


@pytest.mark.slow
def test_old_segmentation_checkpoint_evaluates_as_before(tmp_path):
    metrics, _ = _eval(tmp_path, "segmentation")
    expected = json.loads((FIXTURES / "segmentation_metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-6)
    assert metrics["IoU"] == pytest.approx(expected["IoU"], abs=1e-6)


@pytest.mark.slow
def test_old_detection_checkpoint_predicts_and_exports(tmp_path):
    """The predictor and the ONNX export read the stored config directly (not through the eval merge): they too drop
    the options of earlier versions, and the predictor gives the detections the evaluation gave then."""
    from inference.export_runner import export
    from inference.predictor import Predictor

    ckpt = FIXTURES / "detection.ckpt"
    _eval(tmp_path, "detection")  # also writes the synthetic val images the fixture was evaluated on
    data = next((tmp_path / "cache").glob("synthetic_coco/*"))
    before: dict[int, list] = {}
    for p in json.loads((FIXTURES / "detection_predictions.json").read_text()):
        before.setdefault(p["image_id"], []).append(p)
    predictor = Predictor.from_checkpoint(ckpt)
    images = sorted((data / "val2017").glob("*.jpg"))
    assert images
    for path, result in zip(images, predictor(images)):
        ref = sorted(before[int(path.stem)], key=lambda p: -p["score"])[:5]
        assert result["scores"][:5] == pytest.approx([p["score"] for p in ref], abs=1e-5)
        x, y, w, h = ref[0]["bbox"]
        assert result["boxes"][0] == pytest.approx([x, y, x + w, y + h], abs=1e-3)
    cfg = compose("export", [f"ckpt={ckpt}", "torchscript=false"])
    export(cfg, tmp_path / "export")
    report = json.loads((tmp_path / "export" / "export.json").read_text())
    assert (tmp_path / "export" / "model.onnx").is_file() and report["onnx"]["check"]["num_detections_equal"]


def test_options_of_earlier_versions_are_dropped_or_replaced():
    from tasks.checkpoint import read_checkpoint

    stored = read_checkpoint(FIXTURES / "detection.ckpt")["effdense_config"]
    assert stored["task"]["module"]["fused_weight_casts"] is False  # an option this version no longer has
    stored["task"]["module"]["postprocess"]["nms_impl"] = "dense"  # a value it no longer has
    cfg = merge_checkpoint_config(compose("eval", ["data=synthetic"]), stored, [], mode="eval", source="old.ckpt")
    assert "fused_weight_casts" not in cfg.task.module
    assert cfg.task.module.postprocess.nms_impl == "auto"
