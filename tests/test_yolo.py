"""YOLO txt data: images/ + labels/ read into the COCO-format dataset (the synthetic shapes written as YOLO, compared
with their COCO copy), class names from the dataset YAML, bad rows, skip_bad, and a short run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detection_formats import coco_source, write_yolo
from omegaconf import OmegaConf
from PIL import Image

from datasets import (
    CocoDetection,
    DatasetError,
    DatasetNotFoundError,
    build_eval_transform,
    load_yolo,
    read_yolo_names,
    yolo_split_dirs,
)
from tasks.config import compose
from tasks.yolo_datamodule import YoloDataModule

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return coco_source(tmp_path_factory.mktemp("coco") / "shapes", num_train=16, num_val=8)


@pytest.fixture(scope="module")
def yolo_root(coco_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo") / "shapes"
    assert write_yolo(coco_root, root) == SHAPES
    return root


def test_reads_the_boxes_of_the_coco_copy(yolo_root, coco_root):
    assert "  0: circle" in (yolo_root / "data.yaml").read_text()  # an id -> name map, as Ultralytics writes it
    assert read_yolo_names(yolo_root) == SHAPES
    dm = YoloDataModule(root=yolo_root, num_classes=4, image_size=128, class_names=None, batch_size=2, num_workers=0)
    dm.setup("fit")
    label_files = [yolo_root / "labels" / s / f"{p.stem}.txt" for s in ("train", "val")
                   for p in (yolo_root / "images" / s).iterdir()]
    assert any(not f.exists() for f in label_files) and any(f.exists() and f.read_text() == "" for f in label_files)
    for split, ds in (("train2017", dm.train_dataset), ("val2017", dm.val_dataset)):
        coco = CocoDetection(image_dir=coco_root / split, ann_file=coco_root / "annotations" / f"instances_{split}.json",
                             transform=build_eval_transform(image_size=128), label_mode="contiguous")
        assert len(ds) == len(coco) and ds.class_names == SHAPES
        for k in range(len(ds)):
            assert np.array_equal(ds.read_image(k), coco.read_image(k))
            (boxes, labels_k), (ref_boxes, ref_labels) = ds.targets(k), coco.targets(k)
            np.testing.assert_allclose(boxes, ref_boxes, atol=1e-3)  # six decimals of the image size
            assert labels_k.tolist() == ref_labels.tolist()
    assert any(len(dm.val_dataset.targets(k)[1]) == 0 for k in range(len(dm.val_dataset)))
    assert dm.describe(dm.val_split)["format"] == "yolo"


def _tiny(root: Path, rows: dict[str, str | None], size=(40, 20), split: str = "train") -> Path:
    """Images ``<name>.jpg`` (W x H = size) with label text ``rows[name]`` (None: no label file)."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for name, text in rows.items():
        Image.new("RGB", size).save(root / "images" / split / f"{name}.jpg")
        if text is not None:
            (root / "labels" / split / f"{name}.txt").write_text(text)
    return root / "labels" / split


def test_rows_polygons_and_layouts(tmp_path):
    labels = _tiny(tmp_path, {"a": "0 0.5 0.5 0.5 0.5\n\n1 0.25 0.5 0.5 1.0\n", "b": "", "c": None,
                              "d": "1 0.1 0.1 0.3 0.2 0.2 0.6\n"})
    data, source = load_yolo(*yolo_split_dirs(tmp_path, "train"), class_names=["cat", "dog"])
    assert source == str(labels)
    assert [(im["file_name"], im["height"], im["width"]) for im in data["images"]] == [
        ("a.jpg", 20, 40), ("b.jpg", 20, 40), ("c.jpg", 20, 40), ("d.jpg", 20, 40)]
    got = [(a["image_id"], a["category_id"], a["bbox"]) for a in data["annotations"]]
    # A polygon row gives its bounding box: x 0.1..0.3, y 0.1..0.6 of 40 x 20.
    assert got == [(1, 1, [10.0, 5.0, 20.0, 10.0]), (1, 2, [0.0, 0.0, 20.0, 20.0]), (4, 2, pytest.approx([4, 2, 8, 10]))]
    # Roboflow's layout: <split>/images and <split>/labels.
    (tmp_path / "valid" / "images").mkdir(parents=True)
    (tmp_path / "valid" / "labels").mkdir()
    assert yolo_split_dirs(tmp_path, "valid") == (tmp_path / "valid" / "images", tmp_path / "valid" / "labels")
    with pytest.raises(DatasetNotFoundError, match=r"neither .*images/test nor .*test/images exists .*\['train'\]"):
        yolo_split_dirs(tmp_path, "test")
    (tmp_path / "images" / "val").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"labels/val does not exist"):
        yolo_split_dirs(tmp_path, "val")


BAD_ROWS = [
    ("fields", "0 0.5 0.5 0.5\n", r"line 2: expected 5 numbers \(class cx cy w h\) or a polygon .*found 4 field"),
    ("six fields", "0 0.5 0.5 0.5 0.5 0.9\n", r"line 2: expected 5 numbers .*found 6 field"),
    ("not a number", "0 0.5 0.5 half 0.5\n", r"line 2: 'half' is not a number"),
    ("class id", "2 0.5 0.5 0.5 0.5\n", r"line 2: class id 2 is not one of 0\.\.1 \(2 class names\)"),
    ("negative class", "-1 0.5 0.5 0.5 0.5\n", r"line 2: class id -1 is not one of 0\.\.1"),
    ("fractional class", "0.5 0.5 0.5 0.5 0.5\n", r"line 2: class id 0\.5 is not one of"),
    ("pixels", "0 20 10 8 4\n", r"line 2: coordinates must be fractions of the image size in \[0, 1\], found 20 10 8 4"),
    ("slightly over", "0 0.5 0.5 1.01 0.5\n", r"line 2: coordinates must be fractions"),
    ("nan", "0 nan 0.5 0.5 0.5\n", r"line 2: non-finite value"),
]


@pytest.mark.parametrize("what,row,pattern", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_row_names_the_file_and_line(tmp_path, what, row, pattern):
    labels = _tiny(tmp_path, {"a": "1 0.5 0.5 1.0005 0.2\n" + row})  # the first row is within the tolerance
    with pytest.raises(DatasetError, match=str(labels / "a.txt").replace(".", r"\.") + ", " + pattern):
        load_yolo(*yolo_split_dirs(tmp_path, "train"), class_names=["cat", "dog"])


def test_skip_bad_counts_what_it_skips(tmp_path, caplog):
    labels = _tiny(tmp_path, {"a": "0 0.5 0.5 0.5 0.5\n0 0.5 0.5\n1 0.5 0.5 0.5 0.5\n5 0.5 0.5 0.5 0.5\n",
                              "b": "0 0.5 0.5 0.5 0.5\n"})
    (tmp_path / "images" / "train" / "c.jpg").write_bytes(b"not an image")
    (labels / "orphan.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    with caplog.at_level(logging.WARNING):
        data, _ = load_yolo(*yolo_split_dirs(tmp_path, "train"), class_names=["cat", "dog"], skip_bad=True)
    assert [im["file_name"] for im in data["images"]] == ["a.jpg", "b.jpg"]
    assert [(a["image_id"], a["category_id"]) for a in data["annotations"]] == [(1, 1), (1, 2), (2, 1)]
    messages = [r.getMessage() for r in caplog.records]
    assert f"{labels}: skipped 2 objects (1 class id out of range, 1 wrong number of fields) and 1 image (1 unreadable " \
           "image) (data.skip_bad=true)" in messages
    assert any("1 label file(s) have no image" in m and "orphan.txt" in m for m in messages)
    with pytest.raises(DatasetError, match=r"a\.txt, line 2: expected 5 numbers"):  # without skip_bad: the first
        load_yolo(*yolo_split_dirs(tmp_path, "train"), class_names=["cat", "dog"])
    (labels / "a.txt").write_text("")
    with pytest.raises(DatasetError, match=r"c\.jpg: not a readable image \(cannot identify image file"):
        load_yolo(*yolo_split_dirs(tmp_path, "train"), class_names=["cat", "dog"])


def test_class_names_from_the_yaml(tmp_path):
    _tiny(tmp_path, {"a": ""})
    with pytest.raises(DatasetNotFoundError, match=r"no dataset YAML .*data.class_names=\[\.\.\.\]"):
        read_yolo_names(tmp_path)
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\nnc: 2\n")
    assert read_yolo_names(tmp_path) == ["cat", "dog"]
    (tmp_path / "other.yml").write_text("names:\n  1: dog\n  0: cat\n  2: 7\n")
    with pytest.raises(DatasetError, match=r"several YAML files \(data.yaml, other.yml\): .*data.yaml_file="):
        read_yolo_names(tmp_path)
    assert read_yolo_names(tmp_path, "other.yml") == ["cat", "dog", "7"]
    for text, pattern in [("names: {0: cat, 2: dog}\n", r"the keys of 'names' must be the class ids 0\.\.1, found 0, 2"),
                          ("names: [cat, dog]\nnc: 3\n", r"nc is 3 but 'names' has 2 entries"),
                          ("train: images/train\n", r"no 'names:'"),
                          ("names: [cat\n", r"not a readable YAML file \(.*line 1")]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(DatasetError, match=str(tmp_path / "bad.yaml") + ": " + pattern):
            read_yolo_names(tmp_path, "bad.yaml")
    with pytest.raises(DatasetNotFoundError, match=r"missing.yaml does not exist \(data.yaml_file\)"):
        read_yolo_names(tmp_path, "missing.yaml")

    # The config reads them, and counts the classes, unless data.class_names is given.
    cfg = OmegaConf.to_container(compose("train", ["data=yolo", f"data.root={tmp_path}", "data.yaml_file=other.yml"]),
                                 resolve=True)
    assert cfg["data"]["class_names"] == ["cat", "dog", "7"] and cfg["data"]["num_classes"] == cfg["head"]["num_classes"] == 3
    cfg = OmegaConf.to_container(compose("train", ["data=yolo", f"data.root={tmp_path}", "data.class_names=[a,b]"]),
                                 resolve=True)
    assert cfg["data"]["num_classes"] == 2


def test_missing_folder_is_one_line_from_the_cli(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "task=detection", "data=yolo",
           f"data.root={tmp_path / 'mydata'}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"error: YOLO data not found: {tmp_path / 'mydata'} does not exist")


@pytest.mark.slow
def test_train_and_evaluate_yolo(yolo_root, tmp_path):
    from tasks.runner import train

    overrides = ["data=yolo", f"data.root={yolo_root}", "model.image_size=128", "neck.channels=16", "neck.num_repeats=1",
                 "head.depth=1", "data.batch_size=4", "data.num_workers=0", "trainer.accelerator=cpu",
                 "trainer.enable_progress_bar=false", "task.module.precise_bn.num_batches=2", "trainer.max_steps=4",
                 "trainer.max_epochs=1"]
    run = tmp_path / "run"
    train(compose("train", overrides), run)
    metrics = json.loads((run / "metrics.json").read_text())
    described = metrics.pop("data")
    assert described["format"] == "yolo" and described["split"] == "val" and described["images"] == 8
    per_class = metrics.pop("per_class")
    assert list(per_class) == SHAPES and all(set(row) == {"AP", "AP50", "num_gt"} for row in per_class.values())
    assert list(metrics) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    preds = json.loads((run / "predictions.json").read_text())
    assert {p["category_id"] for p in preds} <= {1, 2, 3, 4}
    config = OmegaConf.load(run / "config.yaml")
    assert list(config.data.class_names) == SHAPES  # stored resolved: evaluation needs no YAML
