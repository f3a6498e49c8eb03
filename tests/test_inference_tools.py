"""Self-describing checkpoints: prediction, export, fine-tuning, the checkpoint/config merge and the
custom-head example from the docs."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference.predictor import Predictor
from tasks.checkpoint import CheckpointError, merge_checkpoint_config, read_checkpoint
from tasks.config import compose
from tasks.runner import evaluate, load_finetune_weights, train

ROOT = Path(__file__).resolve().parent.parent

# BatchNorm statistics are not recomputed for these barely trained models: over their 2-8 training images some
# channels of the coarsest maps are nearly constant, and the near-zero variances (down to 0.002, eps 0.001) amplify
# float rounding past the absolute tolerances the export and prediction checks are written for.
TINY_DET = [
    "data=synthetic", "model.image_size=128", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
    "data.batch_size=4", "data.num_workers=0", "data.synthetic.num_train=8", "data.synthetic.num_val=4",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=2", "trainer.max_epochs=1",
    "task.module.precise_bn.enabled=false",
]
TINY_SEG = [
    "task=segmentation", "data=synthetic", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
    "data.batch_size=2", "data.num_workers=0", "data.synthetic.num_train=2", "data.synthetic.num_val=2",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=1", "trainer.max_epochs=1",
    "task.module.precise_bn.enabled=false",
]


def _distinctive(path: Path, out: Path, key_part: str) -> Path:
    """Copy of a checkpoint whose class-prediction layer is randomised strongly, so scores vary from anchor to
    anchor and have no near-ties (a barely trained model scores almost every anchor the same)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key, value in ckpt["state_dict"].items():
        if key_part in key and (key.endswith(("bias", "weight"))):
            ckpt["state_dict"][key] = torch.randn(value.shape, generator=g) * (3.0 if key.endswith("bias") else 1.0)
    torch.save(ckpt, out)
    return out


def _trained_run(tmp: Path, overrides: list[str], key_part: str, dataset: str) -> dict:
    """Train a tiny model in ``tmp/run``; also a copy of its checkpoint with distinctive ``key_part`` weights."""
    run = tmp / "run"
    train(compose("train", [*overrides, f"cache_dir={tmp / 'cache'}"]), run)
    ckpt = _distinctive(run / "checkpoints" / "last.ckpt", tmp / "distinct.ckpt", key_part)
    return {"tmp": tmp, "run": run, "ckpt": ckpt, "data": next((tmp / "cache").glob(f"{dataset}/*"))}


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    return _trained_run(tmp_path_factory.mktemp("det"), TINY_DET, "class_net.predict", "synthetic_coco")


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    return _trained_run(tmp_path_factory.mktemp("seg"), TINY_SEG, "head.classifier", "synthetic_cityscapes")


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_carry_config_and_class_names(det_run):
    ckpt = read_checkpoint(det_run["run"] / "checkpoints" / "last.ckpt")
    assert ckpt["effdense_config"]["model"]["image_size"] == 128
    assert ckpt["effdense_class_names"] == ["circle", "square", "triangle", "cross"]


def test_eval_needs_only_the_checkpoint(det_run, tmp_path):
    """eval.yaml composes COCO defaults; the checkpoint supplies model, task and (unless overridden) data."""
    ckpt = det_run["run"] / "checkpoints" / "last.ckpt"
    cfg = compose("eval", [f"ckpt={ckpt}"])
    metrics = evaluate(cfg, tmp_path / "eval", overrides=[f"ckpt={ckpt}"])
    assert set(metrics) >= {"AP", "AP50"}
    assert (tmp_path / "eval" / "predictions.json").is_file()


def test_merge_rules():
    ck = {
        "task": {"name": "detection", "module": {"postprocess": {"iou_threshold": 0.5}}},
        "backbone": {"name": "efficientnet_b0"}, "head": {"num_classes": 90}, "model": {"image_size": 512},
        "data": {"num_classes": 90, "root": "/somewhere"},
    }
    cfg = compose("eval", ["ckpt=x"])
    merged = merge_checkpoint_config(cfg, ck, ["ckpt=x", "task.module.postprocess.iou_threshold=0.6"])
    assert merged.task.module.postprocess.iou_threshold == 0.6
    assert merged.data.root == "/somewhere" and merged.head.num_classes == 90
    # Naming the data on the command line keeps the composed data config.
    merged = merge_checkpoint_config(cfg, ck, ["ckpt=x", "data=synthetic"])
    assert merged.data.root != "/somewhere"
    merged = merge_checkpoint_config(cfg, ck, ["ckpt=x", "data.num_classes=91"])
    assert merged.data.root == "/somewhere" and merged.data.num_classes == 91
    # Fine-tuning: class counts follow the new data, the training recipe is the composed one.
    merged = merge_checkpoint_config(compose("train", ["data=synthetic"]), ck, [], mode="finetune")
    assert merged.head.num_classes == merged.data.num_classes == 4
    with pytest.raises(CheckpointError, match="task 'detection'.*task='segmentation'"):
        merge_checkpoint_config(compose("eval", ["ckpt=x", "task=segmentation"]), ck, ["task=segmentation"])
    with pytest.raises(CheckpointError, match="backbone"):
        merge_checkpoint_config(compose("eval", ["ckpt=x", "backbone=b3"]), ck, ["backbone=b3"])


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        read_checkpoint(bad)
    torch.save({"weights": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        read_checkpoint(tmp_path / "other.ckpt")


# ---------------------------------------------------------------------------------------------- prediction
def test_predictor_matches_evaluation(det_run, tmp_path):
    ckpt = det_run["ckpt"]
    metrics_dir = tmp_path / "eval"
    evaluate(compose("eval", [f"ckpt={ckpt}"]), metrics_dir, overrides=[f"ckpt={ckpt}"])
    by_image: dict[int, list] = {}
    for p in json.loads((metrics_dir / "predictions.json").read_text()):
        by_image.setdefault(p["image_id"], []).append(p)
    predictor = Predictor.from_checkpoint(ckpt)
    images = sorted((det_run["data"] / "val2017").glob("*.jpg"))
    results = predictor(images)
    assert len(results) == len(images) == 4
    cat_ids = [1, 3, 7, 12]  # the synthetic categories, in label order
    for path, result in zip(images, results):
        ref = sorted(by_image[int(path.stem)], key=lambda p: -p["score"])[:5]
        assert result["scores"][:5] == pytest.approx([p["score"] for p in ref], abs=1e-5)
        x, y, w, h = ref[0]["bbox"]
        assert result["boxes"][0] == pytest.approx([x, y, x + w, y + h], abs=1e-3)
        assert cat_ids[result["labels"][0]] == ref[0]["category_id"]
        assert result["names"][0] == predictor.class_names[result["labels"][0]]
    # Arrays and tensors give the same as paths.
    image = cv2.cvtColor(cv2.imread(str(images[0])), cv2.COLOR_BGR2RGB)
    for item in (image, torch.from_numpy(image).permute(2, 0, 1)):
        assert predictor(item)[0]["scores"][:5] == pytest.approx(results[0]["scores"][:5], abs=1e-6)


def _tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *args], check=False, capture_output=True, text=True,
        timeout=600, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_predict_tool_writes_json_and_pictures(det_run, seg_run, tmp_path):
    val = det_run["data"] / "val2017"
    proc = _tool("predict.py", f"ckpt={det_run['ckpt']}", f"inputs={val}", f"hydra.run.dir={tmp_path / 'det'}",
                 "score_threshold=0.2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries = json.loads((tmp_path / "det" / "predictions.json").read_text())
    assert [Path(e["file_name"]).name for e in entries] == sorted(p.name for p in val.glob("*.jpg"))
    for e in entries:
        assert len(e["boxes"]) == len(e["scores"]) == len(e["labels"]) == len(e["names"])
        assert all(s >= 0.2 for s in e["scores"])
        picture = cv2.imread(str(tmp_path / "det" / "visualizations" / f"{Path(e['file_name']).stem}.png"))
        assert picture is not None and picture.shape[:2] == cv2.imread(e["file_name"]).shape[:2]

    image = next((seg_run["data"] / "leftImg8bit" / "val").glob("*/*.png"))
    proc = _tool("predict.py", f"ckpt={seg_run['ckpt']}", f"inputs={image}", f"hydra.run.dir={tmp_path / 'seg'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (entry,) = json.loads((tmp_path / "seg" / "predictions.json").read_text())
    mask = cv2.imread(str(tmp_path / "seg" / entry["mask"]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == cv2.imread(str(image)).shape[:2] and mask.max() < 19
    assert (tmp_path / "seg" / "visualizations" / f"{image.stem}.png").is_file()

    proc = _tool("predict.py", f"ckpt={det_run['ckpt']}", f"inputs={tmp_path / 'nothing'}",
                 f"hydra.run.dir={tmp_path / 'x'}")
    assert proc.returncode == 2 and "nothing" in proc.stderr and "Traceback" not in proc.stderr


def test_segmentation_predictor_matches_eval_pngs(seg_run, tmp_path):
    from datasets import train_ids_to_label_ids

    ckpt = seg_run["ckpt"]
    evaluate(compose("eval", [f"ckpt={ckpt}"]), tmp_path / "eval", overrides=[f"ckpt={ckpt}"])
    predictor = Predictor.from_checkpoint(ckpt)
    for image in sorted((seg_run["data"] / "leftImg8bit" / "val").glob("*/*.png")):
        (result,) = predictor(image)
        written = cv2.imread(str(tmp_path / "eval" / "predictions" / image.name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(train_ids_to_label_ids(result["mask"]), written)


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("postprocess", [True, False])
def test_export_detection_onnx_matches_pytorch(det_run, tmp_path, postprocess):
    out = tmp_path / "export"
    proc = _tool("export.py", f"ckpt={det_run['ckpt']}", f"hydra.run.dir={out}", f"postprocess={postprocess}",
                 "dynamic_batch=true", f"torchscript={postprocess}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "export.json").read_text())
    assert (out / "model.onnx").is_file()
    for check in (report["onnx"]["check"], report["onnx"]["check_batch_2"]):
        if postprocess:
            assert check["num_detections_equal"] and check["matched_fraction"] == 1.0
            assert check["boxes"] < 1e-2 and check["scores"] < 1e-4
        else:
            assert check["cls_logits"] < 1e-4 and check["box_deltas"] < 1e-4 and check["anchors"] == 0.0
    if postprocess:
        assert report["torchscript"]["check"]["matched_fraction"] == 1.0


def test_export_segmentation_onnx(seg_run, tmp_path):
    out = tmp_path / "export"
    proc = _tool("export.py", f"ckpt={seg_run['ckpt']}", f"hydra.run.dir={out}", "torchscript=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((out / "export.json").read_text())["onnx"]["check"]
    assert check["logits"] < 1e-3 and check["labels_agree"] > 0.999


# ---------------------------------------------------------------------------------------------- fine-tuning
def test_finetune_with_another_class_count(det_run, tmp_path, caplog):
    """A 13-class checkpoint (category-id labels) fine-tuned on the 4-class synthetic data: only the class
    prediction layer is re-initialised; training runs end to end with only init_from given."""
    src_run = tmp_path / "src"
    train(compose("train", [*TINY_DET, f"cache_dir={det_run['tmp'] / 'cache'}", "data.label_mode=category_id",
                            "data.num_classes=13", "eval_after_train=false"]), src_run)
    src = src_run / "checkpoints" / "last.ckpt"

    from hydra.utils import instantiate

    cfg = merge_checkpoint_config(compose("train", ["data=synthetic"]), read_checkpoint(src)["effdense_config"], [],
                                  mode="finetune")
    model = instantiate(cfg.model)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    reinit = load_finetune_weights(model, read_checkpoint(src), source=src)
    assert reinit == ["head.class_net.predict.pointwise.weight", "head.class_net.predict.pointwise.bias"]
    loaded = read_checkpoint(src)["state_dict"]
    for key, value in model.state_dict().items():
        if key in reinit:
            assert torch.equal(value, fresh[key])
        else:
            assert torch.equal(value, loaded[f"model.{key}"]), key

    run = tmp_path / "ft"
    overrides = [f"init_from={src}", "data=synthetic", "data.num_workers=0", "data.batch_size=4",
                 "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                 "trainer.enable_progress_bar=false", f"cache_dir={det_run['tmp'] / 'cache'}",
                 "backbone.frozen_stages=2"]
    with caplog.at_level("WARNING"):
        result = train(compose("train", overrides), run, overrides=overrides)
    assert "re-initialised 2 class-specific tensors" in caplog.text
    assert "AP" in result["metrics"]
    stored = read_checkpoint(run / "checkpoints" / "last.ckpt")["effdense_config"]
    assert stored["head"]["num_classes"] == 4 and stored["neck"]["channels"] == 16  # structure from init_from


def test_finetune_from_another_architecture_is_an_error(det_run, tmp_path):
    ckpt = read_checkpoint(det_run["ckpt"])
    ckpt["state_dict"] = {k.replace("neck.", "neck_x."): v for k, v in ckpt["state_dict"].items()}
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    overrides = [f"init_from={bad}", "data=synthetic", "trainer.max_steps=1", "trainer.accelerator=cpu",
                 f"cache_dir={det_run['tmp'] / 'cache'}"]
    with pytest.raises(CheckpointError, match="beyond its class layers"):
        train(compose("train", overrides), tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written


# ---------------------------------------------------------------------------------------------- docs
def test_custom_head_example_from_the_docs_runs():
    result = runpy.run_path(str(ROOT / "docs" / "examples" / "custom_head.py"), run_name="example")["main"]()
    assert result["heatmap"].shape == (2, 3, 32, 32) and result["size"].shape == (2, 2, 32, 32)
    assert [s.stride for s in result["specs"].values()] == [8, 16, 32, 64]
    assert np.isfinite(result["loss"])


def test_output_names_do_not_collide(tmp_path):
    """Pictures are named by the input's stem; repeated stems (same name in two folders, or two extensions) get
    their path below the common folder, so no output overwrites another."""
    from inference.predict_runner import output_names

    paths = [tmp_path / "camA" / "0001.jpg", tmp_path / "camB" / "0001.jpg", tmp_path / "camA" / "frame.jpg",
             tmp_path / "camA" / "frame.png", tmp_path / "camB" / "solo.jpg"]
    names = output_names(paths)
    assert names == {paths[0]: "camA__0001.jpg", paths[1]: "camB__0001.jpg", paths[2]: "camA__frame.jpg",
                     paths[3]: "camA__frame.png", paths[4]: "solo"}
    clash = [tmp_path / "a__b.jpg", tmp_path / "a" / "b.jpg", tmp_path / "x" / "a__b.jpg"]
    assert len(set(output_names(clash).values())) == 3


def test_images_are_read_as_stored_like_the_datasets(tmp_path):
    """An EXIF-rotated JPEG: prediction reads the stored pixels, as the datasets do for training and evaluation
    (boxes then refer to the same frame as the annotations)."""
    from PIL import Image

    from datasets._imageio import decode_image, read_file
    from inference.predictor import read_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(np.zeros((60, 100, 3), np.uint8)).save(path, exif=exif)
    stored = decode_image(read_file(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, path)
    assert stored.shape == (60, 100, 3) and read_rgb(path).shape == (60, 100, 3)
