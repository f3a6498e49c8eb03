"""COCO loader: label mapping, crowd and degenerate handling, errors that name the file, collate."""

from __future__ import annotations

import json
import logging
import pickle

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets import (
    CocoDetection,
    DatasetError,
    DatasetNotFoundError,
    build_eval_transform,
    build_train_transform,
    collate_detection,
)


def _ds(root, split="val2017", size=128, **kw):
    return CocoDetection(
        image_dir=root / split,
        ann_file=root / "annotations" / f"instances_{split}.json",
        transform=build_eval_transform(image_size=size),
        **kw,
    )


def _load(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_eval_samples_map_back_to_the_json(synthetic_coco):
    """Category mapping and boxes, checked against the JSON itself: label k is cat_ids[k], and the eval
    boxes divided by ``scale`` are the JSON's xywh boxes (within 1 px); crowds are not targets."""
    ds = _ds(synthetic_coco, "train2017")
    data = _load(synthetic_coco, "train2017")
    assert ds.cat_ids == sorted(c["id"] for c in data["categories"]) and ds.num_classes == len(data["categories"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert ds.class_names == [names[i] for i in ds.cat_ids]
    assert ds.image_ids == sorted(img["id"] for img in data["images"])
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    assert ds.num_crowd == len(crowd) > 0 and ds.num_degenerate == 0
    total = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 128, 128) and s["image"].dtype == torch.uint8 and s["image"].is_contiguous()
        assert s["boxes"].dtype == torch.float32 and s["labels"].dtype == torch.int64
        assert s["orig_size"] == sizes[s["image_id"]]
        assert s["scale"] == pytest.approx(128 / max(sizes[s["image_id"]]))
        anns = [a for a in data["annotations"] if a["image_id"] == s["image_id"] and not a["iscrowd"]]
        expected = sorted((a["category_id"], *a["bbox"]) for a in anns)
        b = s["boxes"].numpy() / s["scale"]
        got = sorted(
            (ds.cat_ids[int(label)], x0, y0, x1 - x0, y1 - y0)
            for label, (x0, y0, x1, y1) in zip(s["labels"].tolist(), b.tolist())
        )
        assert [g[0] for g in got] == [e[0] for e in expected]
        got_boxes = np.array(got, dtype=np.float64).reshape(-1, 5)[:, 1:]
        np.testing.assert_allclose(got_boxes, np.array(expected, dtype=np.float64).reshape(-1, 5)[:, 1:], atol=1)
        total += len(got)
    assert total == len(data["annotations"]) - len(crowd)


def test_images_without_objects_are_kept(synthetic_coco):
    ds = _ds(synthetic_coco, "train2017")
    data = _load(synthetic_coco, "train2017")
    with_targets = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
    empty = [i for i, img_id in enumerate(ds.image_ids) if img_id not in with_targets]
    assert empty and len(ds) == len(data["images"])
    s = ds[empty[0]]
    assert s["boxes"].shape == (0, 4) and s["labels"].shape == (0,)
    assert s["image"].shape == (3, 128, 128)


def test_category_id_label_mode(synthetic_coco):
    ds = _ds(synthetic_coco, "train2017", label_mode="category_id", num_classes=20)
    assert ds.num_classes == 20 and ds.cat_ids == list(range(1, 21))
    data = _load(synthetic_coco, "train2017")
    assert ds.class_names[2] == next(c["name"] for c in data["categories"] if c["id"] == 3)
    for i in range(len(ds)):
        cats = sorted(a["category_id"] for a in data["annotations"] if a["image_id"] == ds.image_ids[i] and not a["iscrowd"])
        assert sorted(int(label) + 1 for label in ds[i]["labels"]) == cats
    with pytest.raises(DatasetError, match=r"1\.\.10"):
        _ds(synthetic_coco, "train2017", label_mode="category_id", num_classes=10)  # the ids go up to 12


def _write(root, data):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2017").mkdir(exist_ok=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))


def _tiny():
    """One 60 x 40 image: a normal box, a too-thin box, a box cut by the border, one on the border with no
    area (boxes entirely outside the image are bad input: tests/test_bad_input.py), a crowd."""
    return {
        "images": [{"id": 5, "file_name": "a.jpg", "height": 40, "width": 60}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 9, "bbox": [1, 1, 20, 20], "iscrowd": 0, "area": 400},
            {"id": 2, "image_id": 5, "category_id": 9, "bbox": [5, 5, 0.5, 10], "iscrowd": 0, "area": 5},
            {"id": 3, "image_id": 5, "category_id": 4, "bbox": [50, 30, 20, 20], "iscrowd": 0, "area": 100},
            {"id": 4, "image_id": 5, "category_id": 4, "bbox": [60, 5, 0, 10], "iscrowd": 0, "area": 0},
            {"id": 6, "image_id": 5, "category_id": 4, "bbox": [30, 2, 10, 10], "iscrowd": 1, "area": 100},
        ],
        "categories": [{"id": 9, "name": "thing"}, {"id": 4, "name": "other"}],
    }


def test_degenerate_boxes_dropped_and_counted(tmp_path, caplog):
    _write(tmp_path, _tiny())
    cv2.imwrite(str(tmp_path / "val2017" / "a.jpg"), np.full((40, 60, 3), 128, np.uint8))
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        ds = CocoDetection(
            image_dir=tmp_path / "val2017",
            ann_file=tmp_path / "annotations" / "instances_val2017.json",
            transform=build_eval_transform(image_size=60),
        )
    assert ds.num_degenerate == 2 and ds.num_crowd == 1
    assert len([r for r in caplog.records if "dropped 2" in r.getMessage()]) == 1
    assert ds.cat_ids == [4, 9] and ds.class_names == ["other", "thing"]
    s = ds[0]
    assert s["scale"] == 1.0 and s["image_id"] == 5 and s["orig_size"] == (40, 60)
    assert s["labels"].tolist() == [1, 0]  # annotation order kept: category 9 -> label 1, 4 -> 0
    np.testing.assert_allclose(s["boxes"].numpy(), [[1, 1, 21, 21], [50, 30, 60, 40]])


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="image folder not found.*val2017"):
        _ds(tmp_path)
    (tmp_path / "val2017").mkdir()
    ann = tmp_path / "annotations" / "instances_val2017.json"
    with pytest.raises(DatasetNotFoundError) as err:
        _ds(tmp_path)
    assert str(ann) in str(err.value) and isinstance(err.value, FileNotFoundError)


def test_malformed_json_names_file(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match="instances_val2017.json: not a readable JSON"):
        _ds(tmp_path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("categories"), "missing or invalid 'categories'"),
        (lambda d: d.update(categories=[]), "'categories' list is empty"),
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 5 appears more than once"),
        (lambda d: d["images"][0].pop("height"), r"images\[0\] needs"),
        (lambda d: d["annotations"][0].update(category_id=99), "category id 99"),
        (lambda d: d["annotations"][0].update(image_id=77), "unknown image id 77"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "malformed bbox"),
        (lambda d: d["annotations"][2].update(bbox=[1, 2, -3, 4]), "annotation id 3 has a negative box size"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] needs"),
    ],
)
def test_bad_annotations_are_clear_errors(tmp_path, mutate, message):
    data = _tiny()
    mutate(data)
    _write(tmp_path, data)
    with pytest.raises(DatasetError, match=message) as err:
        _ds(tmp_path)
    assert "instances_val2017.json" in str(err.value)


def test_bad_images_name_the_file(tmp_path):
    _write(tmp_path, _tiny())
    (tmp_path / "val2017" / "other.jpg").write_bytes(b"")  # not empty: an empty folder fails at construction
    ds = _ds(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="a.jpg.*does not exist"):
        ds[0]
    (tmp_path / "val2017" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match="a.jpg.*cannot be decoded"):
        ds[0]
    (tmp_path / "val2017" / "a.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="a.jpg.*cannot be decoded"):
        ds[0]
    cv2.imwrite(str(tmp_path / "val2017" / "a.jpg"), np.zeros((60, 40, 3), np.uint8))  # rotated: 60 high
    with pytest.raises(DatasetError, match=r"a.jpg.*60x40.*says 40x60"):
        ds[0]


def test_rgb_channel_order(tmp_path):
    _write(tmp_path, _tiny())
    bgr = np.zeros((40, 60, 3), np.uint8)
    bgr[..., 2] = 250  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "val2017" / "a.jpg"), bgr)
    image = _ds(tmp_path, size=60)[0]["image"]
    assert image[0, :40].float().mean() > 240 and image[2, :40].float().mean() < 10


def test_pickled_dataset_drops_and_reloads_coco(synthetic_coco):
    ds = _ds(synthetic_coco)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._coco is None
    a, b = ds[3], clone[3]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    assert clone.coco.getImgIds() == ds.coco.getImgIds()


def test_train_loader_batches(synthetic_coco):
    ds = CocoDetection(
        image_dir=synthetic_coco / "train2017",
        ann_file=synthetic_coco / "annotations" / "instances_train2017.json",
        transform=build_train_transform(image_size=96, seed=0),
    )
    seen = 0
    for batch in DataLoader(ds, batch_size=5, collate_fn=collate_detection):
        b = batch["images"].shape[0]
        assert batch["images"].shape == (b, 3, 96, 96) and batch["images"].dtype == torch.uint8
        valid = batch["labels"] >= 0
        assert batch["labels"].shape == batch["boxes"].shape[:2]
        assert (batch["labels"][valid] < ds.num_classes).all()
        assert (batch["boxes"][~valid] == 0).all()
        boxes = batch["boxes"][valid]
        assert (boxes >= 0).all() and (boxes <= 96).all() and (boxes[:, 2:] - boxes[:, :2] >= 1).all()
        # Padding only after the real boxes of each image.
        assert torch.equal(valid, valid.sort(dim=1, descending=True, stable=True).values)
        seen += b
    assert seen == len(ds)


def test_collate_pads_to_most_objects():
    def sample(n, image_id):
        return {
            "image": torch.full((3, 8, 8), image_id, dtype=torch.uint8),
            "boxes": torch.arange(n * 4, dtype=torch.float32).view(n, 4) + 1,
            "labels": torch.arange(n) + 2,
            "image_id": image_id,
            "scale": 0.5 * image_id,
            "orig_size": (16, image_id),
        }

    batch = collate_detection([sample(2, 7), sample(0, 9), sample(3, 11)])
    assert batch["images"].shape == (3, 3, 8, 8) and batch["images"][:, 0, 0, 0].tolist() == [7, 9, 11]
    assert batch["boxes"].shape == (3, 3, 4) and batch["boxes"].dtype == torch.float32
    assert batch["labels"].tolist() == [[2, 3, -1], [-1, -1, -1], [2, 3, 4]] and batch["labels"].dtype == torch.int64
    assert batch["boxes"][0, :2].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert (batch["boxes"][0, 2] == 0).all() and (batch["boxes"][1] == 0).all()
    assert batch["boxes"][2].tolist() == (torch.arange(12.0).view(3, 4) + 1).tolist()
    assert batch["image_ids"].tolist() == [7, 9, 11] and batch["image_ids"].dtype == torch.int64
    assert batch["scales"].tolist() == [3.5, 4.5, 5.5] and batch["scales"].dtype == torch.float32
    assert batch["orig_sizes"].tolist() == [[16, 7], [16, 9], [16, 11]] and batch["orig_sizes"].dtype == torch.int64
    empty = collate_detection([sample(0, 1), sample(0, 2)])
    assert empty["boxes"].shape == (2, 0, 4) and empty["labels"].shape == (2, 0)
    assert empty["labels"].dtype == torch.int64
    with pytest.raises(ValueError):
        collate_detection([])
