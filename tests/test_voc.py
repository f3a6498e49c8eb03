"""Pascal VOC data: the VOCdevkit layout read into the COCO-format dataset (the synthetic shapes written as VOC, compared
with their COCO copy), years and splits, VOC's coordinates and difficult objects, bad input, and a short run."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detection_formats import coco_source, voc_xml, write_voc
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets import (
    CocoDetection,
    DatasetError,
    DatasetNotFoundError,
    build_eval_transform,
    load_voc,
    voc_split_files,
)
from tasks.voc_datamodule import VocDataModule

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return coco_source(tmp_path_factory.mktemp("coco") / "shapes", num_train=16, num_val=8)


@pytest.fixture(scope="module")
def devkit(coco_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("voc") / "VOCdevkit"
    assert write_voc(coco_root, root) == SHAPES
    return root


def _module(root, **kwargs) -> VocDataModule:
    options = {"root": root, "num_classes": 4, "image_size": 128, "class_names": SHAPES, "years": [2007],
               "batch_size": 2, "num_workers": 0}
    return VocDataModule(**{**options, **kwargs})


def test_reads_the_boxes_of_the_coco_copy(devkit, coco_root):
    dm = _module(devkit)
    dm.setup("fit")
    for split, ds in (("train2017", dm.train_dataset), ("val2017", dm.val_dataset)):
        coco = CocoDetection(image_dir=coco_root / split, ann_file=coco_root / "annotations" / f"instances_{split}.json",
                             transform=build_eval_transform(image_size=128), label_mode="contiguous")
        assert len(ds) == len(coco) and ds.class_names == SHAPES
        for k in range(len(ds)):
            assert np.array_equal(ds.read_image(k), coco.read_image(k))
            (boxes, labels), (ref_boxes, ref_labels) = ds.targets(k), coco.targets(k)
            np.testing.assert_allclose(boxes, ref_boxes, atol=1e-4)  # VOC's 1-based pixels round-trip exactly
            assert labels.tolist() == ref_labels.tolist()
        # COCO's crowd regions were written as difficult objects: no targets, and ignored regions for evaluation.
        crowds = [a for a in coco.coco.dataset["annotations"] if a["iscrowd"]]
        difficult = [a for a in ds.coco.dataset["annotations"] if a["difficult"]]
        assert difficult and len(difficult) == len(crowds) == ds.num_crowd
        assert all(a["iscrowd"] == 1 for a in difficult)
    assert any(len(dm.val_dataset.targets(k)[1]) == 0 for k in range(len(dm.val_dataset)))  # images without objects
    assert dm.describe(dm.val_split)["format"] == "voc"


def _folder(root: Path, year: int, splits: dict[str, list[str]], size=(40, 30)):
    """A tiny VOC<year> folder: one black image and XML per id, split lists as given."""
    folder = root / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for ids in splits.values():
        for i in ids:
            Image.new("RGB", size).save(folder / "JPEGImages" / f"{i}.jpg")
            (folder / "Annotations" / f"{i}.xml").write_text(
                voc_xml(f"{i}.jpg", *size, [("dog", (1, 1, 10, 10), 0)]))
    for split, ids in splits.items():
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return folder


def test_years_and_splits(tmp_path):
    _folder(tmp_path, 2007, {"trainval": ["000001", "000002"], "test": ["000003"]})
    _folder(tmp_path, 2012, {"trainval": ["2008_000001"]})
    train = voc_split_files(tmp_path, [2007, 2012], "trainval", every_year=True)
    assert [p.parents[2].name for p in train] == ["VOC2007", "VOC2012"]
    data, source = load_voc(train, root=tmp_path, class_names=["dog"])
    assert [im["file_name"] for im in data["images"]] == [
        "VOC2007/JPEGImages/000001.jpg", "VOC2007/JPEGImages/000002.jpg", "VOC2012/JPEGImages/2008_000001.jpg"]
    assert [im["id"] for im in data["images"]] == [1, 2, 3] and "VOC2012" in source
    # The val split: the years that have it (VOC2012 has no public test annotations).
    assert [p.parents[2].name for p in voc_split_files(tmp_path, [2007, 2012], "test", every_year=False)] == ["VOC2007"]
    with pytest.raises(DatasetNotFoundError, match=r"no ImageSets/Main/test.txt under .*VOC2012.*data.val_split=val"):
        voc_split_files(tmp_path, [2012], "test", every_year=False)
    with pytest.raises(DatasetNotFoundError, match=r"VOC2012/ImageSets/Main/test.txt does not exist.*trainval"):
        voc_split_files(tmp_path, [2007, 2012], "test", every_year=True)
    with pytest.raises(DatasetNotFoundError, match=r"VOC2010/Annotations does not exist \(set data.years to the years "
                       r"present: data.years=\[2007, 2012\]\)"):
        voc_split_files(tmp_path, [2007, 2010], "trainval", every_year=True)
    with pytest.raises(DatasetNotFoundError, match=r"nowhere does not exist.*data.years=null"):
        voc_split_files(tmp_path / "nowhere", [2007], "trainval", every_year=True)
    # years=null: data.root is itself one VOC folder (a CVAT or labelImg export).
    dm = _module(tmp_path / "VOC2007", years=None, class_names=["dog"], num_classes=1, val_split="test")
    dm.setup("fit")
    assert len(dm.train_dataset) == 2 and len(dm.val_dataset) == 1
    with pytest.raises(ValueError, match="num_classes=4, but data.class_names has 1"):
        _module(tmp_path, class_names=["dog"])
    with pytest.raises(ValueError, match=r"data.years must be a list of years such as \[2007, 2012\], or null; got \['x'\]"):
        _module(tmp_path, years=["x"])
    assert _module(tmp_path, years=2012).years == [2012]


def test_coordinates_and_sizes(tmp_path):
    folder = _folder(tmp_path, 2007, {"trainval": ["a", "b"]}, size=(40, 30))
    # Pixels 1..10 (inclusive) are the continuous box 0..10; xmin = xmax is one pixel wide; a box may reach 1 px
    # beyond the image (clipped).
    (folder / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", 40, 30, [
        ("dog", (1, 1, 10, 10), 0), ("dog", (5, 6, 5, 6), 0), ("dog", (0, 2, 41, 31), 0), ("dog", (3, 3, 9.5, 8), 1)]))
    # No <size>: the image header gives it.
    (folder / "Annotations" / "b.xml").write_text(voc_xml("b.jpg", 0, 0, [("dog", (1, 1, 40, 30), 0)], size=False))
    data, _ = load_voc(voc_split_files(tmp_path, [2007], "trainval", every_year=True), root=tmp_path,
                       class_names=["cat", "dog"])
    a, b = data["images"]
    assert (a["height"], a["width"]) == (b["height"], b["width"]) == (30, 40)
    boxes = [(ann["bbox"], ann["category_id"], ann["difficult"], ann["iscrowd"]) for ann in data["annotations"]]
    assert boxes == [
        ([0.0, 0.0, 10.0, 10.0], 2, 0, 0), ([4.0, 5.0, 1.0, 1.0], 2, 0, 0), ([0.0, 1.0, 40.0, 29.0], 2, 0, 0),
        ([2.0, 2.0, 7.5, 6.0], 2, 1, 1), ([0.0, 0.0, 40.0, 30.0], 2, 0, 0),
    ]


XML_OK = voc_xml("a.jpg", 40, 30, [("dog", (1, 1, 10, 10), 0)])
BAD_XML = [
    # (what, annotation text, message pattern after the file name)
    ("malformed XML", "<annotation><object></annotation>", r"a\.xml: not well-formed XML \(mismatched tag: line 1"),
    ("not VOC", "<root/>", r"a\.xml: not a VOC annotation XML"),
    ("unknown class", voc_xml("a.jpg", 40, 30, [("dog", (1, 1, 5, 5), 0), ("cow", (1, 1, 5, 5), 0)]),
     r"a\.xml: <object> 2 is a 'cow', which is not in data.class_names \(cat, dog\)"),
    ("outside", voc_xml("a.jpg", 40, 30, [("dog", (1, 1, 42, 10), 0)]),
     r"a\.xml: <object> 1 \(dog\): box xmin=1 ymin=1 xmax=42 ymax=10 reaches beyond its image \(40x30"),
    ("negative", voc_xml("a.jpg", 40, 30, [("dog", (10, 1, 8, 10), 0)]),
     r"a\.xml: <object> 1 \(dog\): xmax 8 < xmin 10"),
    ("no number", XML_OK.replace("<xmax>10</xmax>", "<xmax>ten</xmax>"),
     r"a\.xml: <object> 1 \(dog\): <xmax> is 'ten', not a number"),
    ("no bndbox", XML_OK.replace("<bndbox>", "<box>").replace("</bndbox>", "</box>"),
     r"a\.xml: <object> 1 \(dog\): no <bndbox>"),
    ("no name", XML_OK.replace("<name>dog</name>", ""), r"a\.xml: <object> 1 has no <name>"),
    ("bad size", XML_OK.replace("<width>40</width>", "<width>wide</width>"), r"a\.xml: <size> holds no numbers"),
]


@pytest.mark.parametrize("what,text,pattern", BAD_XML, ids=[b[0] for b in BAD_XML])
def test_bad_annotation_names_the_file_and_object(tmp_path, what, text, pattern):
    folder = _folder(tmp_path, 2007, {"trainval": ["a"]})
    (folder / "Annotations" / "a.xml").write_text(text)
    files = voc_split_files(tmp_path, [2007], "trainval", every_year=True)
    with pytest.raises(DatasetError, match=str(folder / "Annotations").replace(".", r"\.") + "/" + pattern):
        load_voc(files, root=tmp_path, class_names=["cat", "dog"])


def test_bad_split_lists_and_missing_files(tmp_path):
    folder = _folder(tmp_path, 2007, {"trainval": ["a", "b"]})
    split = folder / "ImageSets" / "Main" / "trainval.txt"
    files = voc_split_files(tmp_path, [2007], "trainval", every_year=True)

    def fails(pattern, error=DatasetError):
        with pytest.raises(error, match=pattern):
            load_voc(files, root=tmp_path, class_names=["dog"])

    split.write_text("a\n\nc\n")
    fails(rf"{split}, line 3: image 'c' has no annotation file .*Annotations/c\.xml", DatasetNotFoundError)
    split.write_text("a\nb 1\n")
    fails(rf"{split}, line 2: expected one image id, found 'b 1'")
    split.write_text("a\nb\na\n")
    fails(rf"{split}, line 3: image id 'a' is listed again \(first on line 1\)")
    split.write_text("a\nb\n")
    (folder / "JPEGImages" / "b.jpg").unlink()
    fails(rf"{split}, line 2: image 'b' has no file in .*JPEGImages", DatasetNotFoundError)
    # A <size> that is not the image's: named when the image is read.
    (folder / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", 50, 30, [("dog", (1, 1, 10, 10), 0)]))
    split.write_text("a\n")
    data, source = load_voc(files, root=tmp_path, class_names=["dog"])
    ds = CocoDetection(image_dir=tmp_path, annotations=data, source=source, transform=build_eval_transform(image_size=64))
    with pytest.raises(DatasetError, match=r"a\.jpg: image is 30x40 \(HxW\) but .*Annotations/a\.xml says 30x50"):
        ds.read_image(0)


def test_skip_bad_counts_what_it_skips(tmp_path, caplog):
    folder = _folder(tmp_path, 2007, {"trainval": ["a", "b", "c", "d"]})
    (folder / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", 40, 30, [
        ("dog", (1, 1, 10, 10), 0), ("cow", (1, 1, 5, 5), 0), ("dog", (1, 1, 50, 5), 0), ("dog", (1, 1, 5, 5), 1)]))
    (folder / "Annotations" / "b.xml").write_text("<annotation>")
    (folder / "JPEGImages" / "c.jpg").unlink()
    dm = _module(tmp_path, class_names=["dog"], num_classes=1, val_split="trainval", skip_bad=True)
    with caplog.at_level(logging.WARNING):
        dm.setup("validate")
    ds = dm.val_dataset
    assert len(ds) == 2 and [len(ds.targets(k)[1]) for k in range(2)] == [1, 1]
    assert [a["difficult"] for a in ds.coco.dataset["annotations"]] == [0, 1, 0]
    warnings = [r.getMessage() for r in caplog.records if "skip_bad" in r.getMessage()]
    assert warnings == [(f"{folder}/ImageSets/Main/trainval.txt: skipped 2 objects (1 box outside the image, 1 unknown "
                         "class) and 2 images (1 malformed XML, 1 missing image file) (data.skip_bad=true)")]


def test_missing_devkit_is_one_line_from_the_cli(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "task=detection", "data=voc",
           f"data.root={tmp_path / 'VOCdevkit'}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"error: Pascal VOC data not found: {tmp_path / 'VOCdevkit'} does not exist")


# ------------------------------------------------------------------ end to end
TINY = ["model.image_size=128", "neck.channels=16", "neck.num_repeats=1", "head.depth=1", "data.batch_size=4",
        "data.num_workers=0", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "task.module.precise_bn.num_batches=2"]


@pytest.mark.slow
def test_train_and_evaluate_voc(devkit, tmp_path):
    from voc_reference import devkit_ap

    from tasks.config import compose
    from tasks.runner import evaluate, train

    data = ["data=voc", f"data.root={devkit}", "data.years=[2007]", f"data.class_names=[{','.join(SHAPES)}]"]
    run = tmp_path / "run"
    result = train(compose("train", [*TINY, *data, "trainer.max_steps=4", "trainer.max_epochs=1"]), run)
    metrics = json.loads((run / "metrics.json").read_text())
    described = metrics.pop("data")
    assert described["format"] == "voc" and described["split"] == "test" and described["images"] == 8
    assert {"AP", "AP50", "ARl", "VOC07_AP50", "VOC_AP50"} <= set(metrics)
    assert metrics["VOC07_AP50"] == result["metrics"]["VOC07_AP50"]

    # A separate evaluation of the checkpoint: the VOC numbers equal the devkit's rules applied to its
    # predictions.json, the COCO numbers pycocotools run on the same ground truth (difficult boxes as crowds).
    eval_dir = tmp_path / "eval"
    m = evaluate(compose("eval", [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "trainer.accelerator=cpu"]), eval_dir)
    preds = json.loads((eval_dir / "predictions.json").read_text())
    dm = _module(devkit)
    dm.setup("validate")
    gt = dm.val_dataset.coco.dataset
    dets = {im["id"]: [] for im in gt["images"]}
    for p in preds:
        x, y, w, h = p["bbox"]
        dets[p["image_id"]].append((p["category_id"], x, y, x + w, y + h, p["score"]))
    assert m["VOC07_AP50"] == pytest.approx(devkit_ap(gt, dets, eleven_point=True), abs=1e-9)
    assert m["VOC_AP50"] == pytest.approx(devkit_ap(gt, dets, eleven_point=False), abs=1e-9)
    coco_gt = COCO()
    coco_gt.dataset = json.loads(json.dumps(gt))
    coco_gt.createIndex()
    ev = COCOeval(coco_gt, coco_gt.loadRes(str(eval_dir / "predictions.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert [m[k] for k in ("AP", "AP50", "AP75")] == pytest.approx(list(ev.stats[:3]), abs=1e-12)
    shutil.rmtree(run)
