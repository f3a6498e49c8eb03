"""Rectangular inputs: ``model.image_size=[H, W]`` in the transforms (train crop, eval letterbox and its inverse),
the config checks, training and evaluation, prediction and ONNX export, also at another size than trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datasets import build_eval_transform, build_train_transform
from tasks.checkpoint import merge_checkpoint_config
from tasks.config import compose
from tasks.config_checks import ConfigError, check_export_config, check_predict_config, check_run_config
from utils.sizes import image_hw, stride_error

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- sizes
def test_sizes_read_as_height_and_width():
    assert image_hw(512) == (512, 512)
    assert image_hw([384, 640]) == image_hw((384, 640)) == image_hw(OmegaConf.create([384, 640])) == (384, 640)
    for bad in (0, -3, True, 2.5, "640", [384], [384, 640, 3], [384, 0], [384.0, 640]):
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            image_hw(bad)
    assert stride_error([384, 640], 128) is None and stride_error(512, 128) is None
    assert stride_error([380, 640], 128, name="k") == "k=[380, 640] is not a multiple of 128 on each side; use " \
                                                       "[256, 640] or [384, 640]"
    assert stride_error(300, 128, name="k") == "k=300 is not a multiple of 128; use 256 or 384"


# ---------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize(("hw", "scale", "content"), [
    ((50, 200), 0.64, (32, 128)),  # wide: width limits, padded below
    ((120, 60), 64 / 120, (64, 32)),  # tall: height limits, padded right
    ((40, 40), 1.6, (64, 64)),  # square image in a wide output: padded right
])
def test_eval_letterbox_by_hand(hw, scale, content):
    h, w = hw
    img = np.full((h, w, 3), 200, np.uint8)
    box = np.array([[4, 6, 30, 36]], np.float32)
    out = build_eval_transform(image_size=(64, 128))(img, box, np.array([2]))
    assert out["image"].shape == (64, 128, 3) and out["scale"] == pytest.approx(scale, abs=1e-12)
    ch, cw = content
    assert (out["image"][:ch, :cw] == 200).all()
    assert out["image"][ch:].max(initial=0) == 0 and out["image"][:, cw:].max(initial=0) == 0
    np.testing.assert_allclose(out["boxes"], box * scale, atol=1e-4)
    np.testing.assert_allclose(out["boxes"] / out["scale"], box, atol=1e-4)  # back to original pixels


def test_eval_letterbox_round_trip_to_original_pixels():
    rng = np.random.default_rng(0)
    t = build_eval_transform(image_size=[96, 160])
    for h, w in [(37, 91), (480, 640), (96, 160), (300, 41), (720, 1280), (160, 96)]:
        x0, y0 = rng.uniform(0, w - 8, 10), rng.uniform(0, h - 8, 10)
        boxes = np.stack([x0, y0, rng.uniform(x0 + 4, w), rng.uniform(y0 + 4, h)], 1).astype(np.float32)
        out = t(np.zeros((h, w, 3), np.uint8), boxes, np.arange(10))
        assert out["image"].shape == (96, 160, 3)
        assert out["scale"] == min(96 / h, 160 / w)
        kept = out["labels"]
        assert (out["boxes"][:, 2] <= round(w * out["scale"]) + 1e-3).all()
        assert (out["boxes"][:, 3] <= round(h * out["scale"]) + 1e-3).all()
        np.testing.assert_allclose(out["boxes"] / out["scale"], boxes[kept], rtol=1e-5, atol=1e-3)


def test_square_sizes_are_the_same_as_an_int():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (90, 170, 3), dtype=np.uint8)
    boxes, labels = np.array([[10, 10, 80, 60], [100, 5, 160, 85]], np.float32), np.array([0, 1])
    for build in (build_eval_transform, lambda **kw: build_train_transform(**kw, seed=4)):
        a, b = build(image_size=96), build(image_size=[96, 96])
        for key in range(3):
            x, y = a(img, boxes, labels, sample_key=key), b(img, boxes, labels, sample_key=key)
            assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["boxes"], y["boxes"])
            assert x["scale"] == y["scale"]
    assert build_eval_transform(image_size=96)(img, boxes, labels)["scale"] == 96 / 170  # as before: side / longest
    assert build_eval_transform(image_size=96).image_size == 96
    assert build_eval_transform(image_size=[96, 160]).image_size == (96, 160)


def test_train_without_jitter_fits_and_pads_like_eval():
    # 40 x 40 into 64 x 128, no jitter, no flip: x1.6 -> 64 x 64 at the top left, padded right; the crop is the whole.
    img = np.full((40, 40, 3), 9, np.uint8)
    t = build_train_transform(image_size=[64, 128], scale_range=(1.0, 1.0), hflip_prob=0.0)
    out = t(img, np.array([[10, 5, 20, 15]], np.float32), np.array([2]))
    assert out["image"].shape == (64, 128, 3) and out["scale"] == pytest.approx(1.6)
    assert (out["image"][:, :64] == 9).all() and out["image"][:, 64:].max() == 0
    np.testing.assert_allclose(out["boxes"], [[16, 8, 32, 24]], atol=1e-4)


# ---------------------------------------------------------------------------------------------- config checks
@pytest.mark.parametrize(("value", "message"), [
    ("[380,640]", (r"model.image_size=\[380, 640\] is not a multiple of 8 on each side, the stride of the "
                   r"finest feature level \(P3\): .*; use \[376, 640\] or \[384, 640\]")),
    ("[384,100]", r"use \[384, 96\] or \[384, 104\]$"),
    ("[384]", r"model.image_size must be a positive integer or \[H, W\] \(two positive integers\), got \[384\]"),
    ("[384,0]", r"got \[384, 0\]"),
])
def test_bad_rectangular_sizes_are_one_clear_error(value, message):
    with pytest.raises(ConfigError, match=message):
        check_run_config(compose("train", ["data=synthetic", f"model.image_size={value}"]))


def test_good_rectangular_sizes_pass_and_reach_the_data():
    cfg = compose("train", ["data=synthetic", "model.image_size=[384,640]"])
    check_run_config(cfg)
    assert list(cfg.data.image_size) == [384, 640]
    check_run_config(compose("train", ["data=synthetic", "backbone=b7", "model.image_size=[1280,1536]"]))
    check_run_config(compose("train", ["data=synthetic", "backbone=lite0", "model.image_size=[320,568]"]))
    with pytest.raises(ConfigError, match=r"data.image_size=\[100, 640\]"):
        check_run_config(compose("train", ["data=synthetic", "data.image_size=[100,640]"]))
    check_predict_config(compose("predict", ["ckpt=a", "inputs=b", "image_size=[256,384]"]))
    check_export_config(compose("export", ["ckpt=a", "image_size=[256,384]"]))
    check_export_config(compose("export", ["ckpt=a", "image_size=256"]))
    for name, extra in (("predict", ["inputs=b"]), ("export", [])):
        with pytest.raises(ConfigError, match=r"image_size must be a positive integer .*got \[256, 384, 3\]"):
            (check_predict_config if name == "predict" else check_export_config)(
                compose(name, ["ckpt=a", *extra, "image_size=[256,384,3]"]))


def test_the_train_tool_reports_a_bad_size_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), "data=synthetic", "model.image_size=[380,640]",
         f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: model.image_size=[380, 640] is not a multiple of 8")
    assert "Traceback" not in proc.stderr and not (tmp_path / "cache").exists()


def test_eval_override_of_the_size_reaches_the_stored_data():
    """A checkpoint stores its config resolved (data.image_size a copy of model.image_size): model.image_size=...
    on the eval command line sets both."""
    stored = {"task": {"name": "detection"}, "model": {"image_size": [128, 256]},
              "data": {"image_size": [128, 256], "root": "/somewhere"}}
    merged = merge_checkpoint_config(compose("eval", ["ckpt=x"]), stored, ["ckpt=x", "model.image_size=[256,384]"])
    assert list(merged.model.image_size) == list(merged.data.image_size) == [256, 384]
    merged = merge_checkpoint_config(compose("eval", ["ckpt=x"]), stored, ["ckpt=x"])
    assert list(merged.data.image_size) == [128, 256]
    merged = merge_checkpoint_config(compose("eval", ["ckpt=x"]), {**stored, "model": {"image_size": 512}}, ["ckpt=x"])
    assert merged.model.image_size == 512 and list(merged.data.image_size) == [128, 256]  # set apart: kept


# ---------------------------------------------------------------------------------------------- end to end
TRAINED = [128, 256]
OTHER = [256, 384]
TINY = [
    "data=synthetic", "backbone=timm", "backbone.name=test_efficientnet", f"model.image_size=[{TRAINED[0]},{TRAINED[1]}]",
    "neck.channels=16", "neck.num_repeats=1", "head.depth=1", "data.batch_size=4", "data.num_workers=0",
    "data.synthetic.num_train=8", "data.synthetic.num_val=4", "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false", "trainer.max_steps=2", "trainer.max_epochs=1",
    "task.module.precise_bn.enabled=false",
]


@pytest.fixture(scope="module")
def rect_run(tmp_path_factory):
    """A tiny model trained at 128 x 256, and a copy of its checkpoint with a strongly randomised class layer, so
    scores have no near-ties (a barely trained model scores almost every anchor the same)."""
    from tasks.runner import train

    tmp = tmp_path_factory.mktemp("rect")
    train(compose("train", [*TINY, f"cache_dir={tmp / 'cache'}"]), tmp / "run")
    ckpt = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key, value in ckpt["state_dict"].items():
        if "class_net.predict" in key and key.endswith(("bias", "weight")):
            ckpt["state_dict"][key] = torch.randn(value.shape, generator=g) * (3.0 if key.endswith("bias") else 1.0)
    torch.save(ckpt, tmp / "distinct.ckpt")
    return {"tmp": tmp, "run": tmp / "run", "ckpt": tmp / "distinct.ckpt",
            "data": next((tmp / "cache").glob("synthetic_coco/*"))}


def _evaluate(run: dict, out: Path, *extra: str) -> tuple[dict, dict[int, list]]:
    from tasks.runner import evaluate

    args = [f"ckpt={run['ckpt']}", *extra]
    metrics = evaluate(compose("eval", args), out, overrides=args)
    by_image: dict[int, list] = {}
    for p in json.loads((out / "predictions.json").read_text()):
        by_image.setdefault(p["image_id"], []).append(p)
    return metrics, by_image


def _same_as_evaluation(results, images, by_image) -> None:
    for path, result in zip(images, results):
        ref = sorted(by_image[int(path.stem)], key=lambda p: -p["score"])[:5]
        assert result["scores"][:5] == pytest.approx([p["score"] for p in ref], abs=1e-5)
        x, y, w, h = ref[0]["bbox"]
        assert result["boxes"][0] == pytest.approx([x, y, x + w, y + h], abs=1e-3)


@pytest.mark.slow
def test_train_and_evaluate_at_a_rectangular_size(rect_run):
    from hydra.utils import instantiate

    from tasks.config import register_resolvers

    register_resolvers()
    ckpt = torch.load(rect_run["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stored = ckpt["effdense_config"]
    assert stored["model"]["image_size"] == stored["data"]["image_size"] == TRAINED
    # The batches the run trained and validated on: [B, 3, 128, 256].
    dm = instantiate(OmegaConf.create(stored)["data"])
    dm.setup("fit")
    assert tuple(next(iter(dm.train_dataloader()))["images"].shape[1:]) == (3, *TRAINED)
    assert tuple(next(iter(dm.val_dataloader()))["images"].shape[1:]) == (3, *TRAINED)
    metrics = json.loads((rect_run["run"] / "metrics.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0

    # Evaluation at the trained size and at another one: boxes in original pixels, and the size took effect.
    _, at_trained = _evaluate(rect_run, rect_run["tmp"] / "eval_trained")
    other_metrics, at_other = _evaluate(rect_run, rect_run["tmp"] / "eval_other",
                                        f"model.image_size=[{OTHER[0]},{OTHER[1]}]")
    assert 0.0 <= other_metrics["AP"] <= 1.0
    config = OmegaConf.load(rect_run["tmp"] / "eval_other" / "config.yaml")
    assert list(config.data.image_size) == OTHER
    sizes = {int(p.stem): cv2_size(p) for p in (rect_run["data"] / "val2017").glob("*.jpg")}
    for by_image in (at_trained, at_other):
        for image_id, preds in by_image.items():
            h, w = sizes[image_id]
            for p in preds:
                x, y, bw, bh = p["bbox"]
                assert x >= -1e-3 and y >= -1e-3 and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
    assert any(at_trained[i][0]["score"] != at_other[i][0]["score"] for i in at_trained)


def cv2_size(path: Path) -> tuple[int, int]:
    import cv2

    return cv2.imread(str(path)).shape[:2]


@pytest.mark.slow
def test_predict_at_the_trained_and_at_another_size(rect_run):
    from inference.fast_paths import FastPaths
    from inference.predictor import Predictor

    exact = FastPaths(fold_bn=False, channels_last=False, precision="fp32", compile=False)
    images = sorted((rect_run["data"] / "val2017").glob("*.jpg"))
    for size, extra in ((None, ()), (OTHER, (f"model.image_size=[{OTHER[0]},{OTHER[1]}]",))):
        _, by_image = _evaluate(rect_run, rect_run["tmp"] / f"eval_{size}", *extra)
        predictor = Predictor.from_checkpoint(rect_run["ckpt"], fast=exact, image_size=size)
        assert predictor.image_size == tuple(size or TRAINED)
        _same_as_evaluation(predictor(images), images, by_image)
    # The same through a stored-config override (what config_overrides does in tools/predict.py).
    by_override = Predictor.from_checkpoint(rect_run["ckpt"], fast=exact, overrides=[f"model.image_size={OTHER}"])
    assert by_override.image_size == tuple(OTHER)

    # Boxes are in original pixels: an image and its exact 2x enlargement (each pixel repeated) letterbox into the
    # same network input (at 256 x 384 the first fits unscaled, the second is halved exactly), so the detections of
    # the second are those of the first, twice as large.
    small = np.random.default_rng(3).integers(0, 255, (200, 384, 3), dtype=np.uint8)
    large = small.repeat(2, axis=0).repeat(2, axis=1)
    predictor = Predictor.from_checkpoint(rect_run["ckpt"], fast=exact, image_size=OTHER)
    a, b = predictor([small, large])
    assert len(a["scores"]) == len(b["scores"]) > 0 and b["scores"] == pytest.approx(a["scores"], abs=1e-6)
    np.testing.assert_allclose(np.array(b["boxes"]), 2 * np.array(a["boxes"]), atol=1e-3)
    assert (np.array(a["boxes"])[:, [0, 2]] <= 384 + 1e-3).all() and (np.array(a["boxes"])[:, [1, 3]] <= 200 + 1e-3).all()

    from tasks.config_checks import ConfigError

    with pytest.raises(ConfigError, match=r"image_size=\[200, 380\] is not a multiple of 8 on each side"):
        Predictor.from_checkpoint(rect_run["ckpt"], image_size=[200, 380])


@pytest.mark.slow
def test_onnx_export_at_a_rectangular_size_matches_pytorch(rect_run):
    import onnx
    import onnxruntime as ort

    from inference.export import ExportModule, _compare
    from inference.export_runner import export
    from inference.predictor import Predictor
    from tasks.config_checks import ConfigError

    out = rect_run["tmp"] / "export"
    size = [OTHER[1], OTHER[0]]  # 384 x 256: neither the trained size nor its shape
    report = export(compose("export", [f"ckpt={rect_run['ckpt']}", f"image_size=[{size[0]},{size[1]}]",
                                       "torchscript=false"]), out)
    assert report["image_size"] == size
    check = report["onnx"]["check"]
    assert check["num_detections_equal"] and check["matched_fraction"] == 1.0
    assert check["boxes"] < 1e-2 and check["scores"] < 1e-4
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, *size]

    # An image letterboxed as the predictor does (x1.024 to 379 x 256, 5 rows of padding; much padding would give
    # many anchors equal scores, and NMS may keep either of two equal boxes), in onnxruntime and PyTorch.
    predictor = Predictor.from_checkpoint(rect_run["ckpt"], image_size=size)
    image = np.random.default_rng(5).integers(0, 255, (370, 250, 3), dtype=np.uint8)
    batch = predictor._detection_batch([image])
    x = batch["images"].float()
    assert tuple(x.shape) == (1, 3, *size) and float(batch["scales"][0]) == pytest.approx(256 / 250)
    module = ExportModule(predictor.task).eval()
    theirs = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})
    with torch.no_grad():
        ours = module(x)
    # Matched by label and box (equal scores may come out in either order).
    diffs = _compare(module.output_names, ours, theirs, "detection")
    assert diffs["num_detections_equal"] and int(theirs[3][0]) > 0
    assert diffs["matched_fraction"] == 1.0 and diffs["boxes"] < 1e-2 and diffs["scores"] < 1e-4

    with pytest.raises(ConfigError, match=r"image_size=\[100, 254\] is not a multiple of 8 on each side, the "
                                          r"model's finest stride; use \[96, 248\] or \[104, 256\]"):
        export(compose("export", [f"ckpt={rect_run['ckpt']}", "image_size=[100,254]"]), rect_run["tmp"] / "bad")
    assert not (rect_run["tmp"] / "bad" / "model.onnx").exists()


def test_the_inspection_tools_refuse_a_size_training_would_refuse(tmp_path):
    from tasks.anchor_report import anchor_report
    from tasks.show_data import show_data

    for name, tool in (("anchors", anchor_report), ("show_data", show_data)):
        cfg = compose(name, ["data=synthetic", f"cache_dir={tmp_path / 'cache'}", "model.image_size=[60,100]"])
        with pytest.raises(ConfigError, match=r"model.image_size=\[60, 100\] is not a multiple of 8 on each side"):
            tool(cfg, tmp_path / name)
        assert not (tmp_path / name).exists() and not (tmp_path / "cache").exists()
