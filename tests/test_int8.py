"""INT8 export (ONNX Runtime static quantization) and evaluating / predicting with exported files (``onnx=``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from inference.export_runner import export
from inference.onnx_eval import evaluate_onnx
from inference.onnx_model import OnnxPredictor, read_metadata
from inference.predict_runner import predict
from tasks.checkpoint import CheckpointError
from tasks.config import compose
from tasks.runner import evaluate

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "tests" / "fixtures" / "checkpoints" / "detection.ckpt"
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _data(tmp: Path) -> list[str]:
    return ["data=synthetic", f"cache_dir={tmp / 'cache'}", "data.synthetic.num_val=6", "data.num_workers=0",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    cfg = compose("export", [f"ckpt={CKPT}", "torchscript=false", "quantize=int8", "calib_images=4",
                             f"config_overrides=['data.root={tmp / 'calib'}']"])
    report = export(cfg, tmp / "export")
    return {"tmp": tmp, "report": report, "float": tmp / "export" / "model.onnx",
            "int8": tmp / "export" / "model_int8.onnx"}


def _weight_bytes(path: Path) -> int:
    """Bytes of the convolution weights (float32 in the float file, int8 in the quantized one)."""
    model = onnx.load(str(path))
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "DequantizeLinear")}
    return sum(len(t.raw_data) for t in model.graph.initializer if t.name in weights and t.dims and len(t.dims) == 4)


def test_int8_export_is_quantized_and_close(exported):
    report = exported["report"]["onnx_int8"]
    assert Path(report["file"]) == exported["int8"] and exported["int8"].is_file()
    assert report["calibration"]["images"] == 4 and report["calibration"]["split"] == "train"
    assert report["calibration"]["method"] == "minmax"
    model = onnx.load(str(exported["int8"]))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("DequantizeLinear") > 50
    # Only the network is quantized: NMS and the box decoding stay float.
    assert "NonMaxSuppression" in ops
    dq_inputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    nms = next(n for n in model.graph.node if n.op_type == "NonMaxSuppression")
    assert not set(nms.input) & dq_inputs
    assert report["quantized"]["int8_tensors"] > 20
    # Weights are stored in int8: a quarter of the float32 bytes (the tiny model's file is dominated by graph
    # structure, so the file itself need not shrink; a D0 file does, see docs/deployment.md).
    assert _weight_bytes(exported["int8"]) <= 0.3 * _weight_bytes(exported["float"])
    # The int8 file runs in ONNX Runtime and its best score per image stays within 0.02 of float32's.
    diff = report["difference_vs_float32"]
    assert diff["images"] == 4 and diff["top_score"] < 0.02


def test_metadata_read_back(exported, tmp_path):
    for path, precision in ((exported["float"], "float32"), (exported["int8"], "int8")):
        meta = read_metadata(path)
        assert meta["task"] == "detection" and meta["precision"] == precision
        assert meta["class_names"] == ["circle", "square", "triangle", "cross"]
        assert meta["image_size"] == [128, 128] and meta["outputs"][-1] == "num_detections"
        assert len(meta["mean"]) == 3 and len(meta["std"]) == 3 and meta["config"]["model"]["image_size"] == 128
        assert meta["postprocess"]["max_detections"] > 0
    with pytest.raises(CheckpointError, match="not found"):
        read_metadata(tmp_path / "missing.onnx")
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(CheckpointError, match="text.onnx: not an ONNX model"):
        read_metadata(tmp_path / "text.onnx")
    model = onnx.load(str(exported["float"]))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(CheckpointError, match="bare.onnx: an ONNX model without effdense metadata"):
        read_metadata(tmp_path / "bare.onnx")


@pytest.mark.slow
def test_eval_onnx_equals_checkpoint_eval(exported, tmp_path):
    data = _data(exported["tmp"])
    ref = evaluate(compose("eval", [f"ckpt={CKPT}", *data]), tmp_path / "ckpt", [f"ckpt={CKPT}", *data])
    onnx_args = [f"onnx={exported['float']}", *data]
    got = evaluate_onnx(compose("eval", onnx_args), tmp_path / "f32", onnx_args)
    for key in KEYS:
        assert got[key] == pytest.approx(ref[key], abs=1e-3), key
    written = json.loads((tmp_path / "f32" / "metrics.json").read_text())
    assert written["model"]["precision"] == "float32" and written["data"]["images"] == 6
    preds = json.loads((tmp_path / "f32" / "predictions.json").read_text())
    assert preds and {"image_id", "category_id", "bbox", "score"} <= set(preds[0])
    int8_args = [f"onnx={exported['int8']}", *data]
    q = evaluate_onnx(compose("eval", int8_args), tmp_path / "i8", int8_args)
    assert all(math.isfinite(q[k]) for k in KEYS)


@pytest.mark.slow
def test_predict_onnx_equals_checkpoint_predict(exported, tmp_path):
    images = exported["tmp"] / "calib"
    inputs = sorted(images.rglob("val2017/*.jpg"))[:3] or sorted(images.rglob("*.jpg"))[:3]
    folder = tmp_path / "images"
    folder.mkdir()
    for p in inputs:
        (folder / p.name).write_bytes(p.read_bytes())
    common = [f"inputs={folder}", "score_threshold=0.01", "device=cpu"]
    ref = predict(compose("predict", [f"ckpt={CKPT}", *common, "fast.fold_bn=false", "fast.channels_last=false",
                                      "fast.precision=fp32"]), tmp_path / "ckpt")
    got = predict(compose("predict", [f"onnx={exported['float']}", *common]), tmp_path / "onnx")
    assert [e["file_name"] for e in got] == [e["file_name"] for e in ref]
    assert sum(len(e["boxes"]) for e in ref) > 0
    # The graph clips boxes to its whole input before NMS, checkpoint prediction to the image's part of it: boxes
    # reaching into the letterbox padding (at the right or bottom edge) may suppress others differently, which moves
    # the max_detections cut. The best 50 detections away from those edges are the same.
    for r, g, image in zip(ref, got, inputs):
        h, w = cv2.imread(str(image)).shape[:2]
        assert len(g["boxes"]) == len(r["boxes"])
        for box, score, label in list(zip(r["boxes"], r["scores"], r["labels"]))[:50]:
            if box[2] >= w - 1 or box[3] >= h - 1:
                continue
            near = [i for i, (b, lab) in enumerate(zip(g["boxes"], g["labels"]))
                    if lab == label and np.abs(np.subtract(b, box)).max() <= 0.5]
            assert near and min(abs(g["scores"][i] - score) for i in near) < 1e-4
        assert (tmp_path / "onnx" / g["visualization"]).is_file()
    assert len(OnnxPredictor(exported["int8"])(inputs[0])) == 1


@pytest.mark.slow
def test_tools_refuse_bad_model_sources_in_one_line(exported, tmp_path):
    (tmp_path / "model.onnx").write_bytes(CKPT.read_bytes()[:1000])
    cases = {
        f"ckpt={CKPT} onnx={exported['float']}": "not both",
        f"onnx={tmp_path / 'missing.onnx'}": "ONNX file not found",
        f"onnx={tmp_path / 'model.onnx'}": "not an ONNX model",
        "": "give the model to run",
    }
    for args, message in cases.items():
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), *args.split(),
                               f"hydra.run.dir={tmp_path / 'run'}"], check=False, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_graph_of_fixed_batch_takes_any_number_of_images(exported, tmp_path):
    """A file exported for batches of 2 predicts 3 images (the last batch padded) as the batch-1 file does."""
    export(compose("export", [f"ckpt={CKPT}", "torchscript=false", "batch_size=2"]), tmp_path / "b2")
    pair = OnnxPredictor(tmp_path / "b2" / "model.onnx")
    single = OnnxPredictor(exported["float"])
    assert pair.batch_size == 2 and single.batch_size in (1, None)
    inputs = sorted((exported["tmp"] / "calib").rglob("*.jpg"))[:3]
    got, ref = pair(inputs), single(inputs)
    assert len(got) == len(ref) == 3
    for g, r in zip(got, ref):
        assert g["labels"] == r["labels"] and len(g["boxes"]) > 0
        np.testing.assert_allclose(g["boxes"], r["boxes"], atol=1e-3)
        np.testing.assert_allclose(g["scores"], r["scores"], atol=1e-5)
