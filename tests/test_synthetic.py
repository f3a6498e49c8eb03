"""The synthetic COCO-format generator: real format, COCO's quirks, images that match their annotations,
caching and atomic writes."""

from __future__ import annotations

import contextlib
import io
import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from datasets import SYNTHETIC_CATEGORIES, DatasetError, synthetic, synthetic_coco_root, write_synthetic_coco

# pycocotools' mask.decode trips a harmless numpy 2 deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPLIT_SIZES = (("train2017", 16), ("val2017", 8))  # the conftest fixture's num_train / num_val


def _load(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_real_coco_format_with_quirks(synthetic_coco):
    all_ann_ids = []
    for split, n in SPLIT_SIZES:
        data = _load(synthetic_coco, split)
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(synthetic_coco / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
        cat_ids = sorted(coco.getCatIds())
        assert len(cat_ids) >= 4 and cat_ids != list(range(1, len(cat_ids) + 1)), "category ids need gaps"
        assert all({"id", "name", "supercategory"} <= set(c) for c in data["categories"])
        image_ids = sorted(coco.getImgIds())
        assert image_ids != list(range(len(image_ids))) and image_ids[0] > 0
        for img in data["images"]:
            pixels = cv2.imread(str(synthetic_coco / split / img["file_name"]))
            assert pixels is not None and pixels.shape == (img["height"], img["width"], 3)
            assert 160 <= img["height"] <= 224 and 160 <= img["width"] <= 224
        assert len({(i["height"], i["width"]) for i in data["images"]}) > 1, "image sizes vary"
        for ann in data["annotations"]:
            img = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"] and w > 0 and h > 0
            assert ann["area"] > 0
        all_ann_ids += [a["id"] for a in data["annotations"]]
        with_objects = {a["image_id"] for a in data["annotations"]}
        assert any(img["id"] not in with_objects for img in data["images"]), f"{split} needs images without objects"
        per_image = [len(coco.getAnnIds(imgIds=[i], iscrowd=False)) for i in image_ids]
        assert max(per_image) <= 4
    assert len(set(all_ann_ids)) == len(all_ann_ids), "annotation ids are unique"


def _touches_border(ann, img):
    x, y, w, h = ann["bbox"]
    return x == 0 or y == 0 or x + w == img["width"] or y + h == img["height"]


def test_crowds_are_rle_and_objects_cross_the_border(synthetic_coco):
    data = _load(synthetic_coco, "train2017")
    images = {img["id"]: img for img in data["images"]}
    crowds = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowds, "needs iscrowd annotations"
    for a in crowds:
        seg = a["segmentation"]
        assert isinstance(seg, dict) and isinstance(seg["counts"], str)
        assert seg["size"] == [images[a["image_id"]]["height"], images[a["image_id"]]["width"]]
        rle = dict(seg, counts=seg["counts"].encode())
        assert float(mask_utils.area(rle)) == a["area"]
        np.testing.assert_allclose(mask_utils.toBbox(rle), a["bbox"])
    assert any(_touches_border(a, images[a["image_id"]]) for a in data["annotations"] if not a["iscrowd"])


def test_polygons_boxes_and_colours_match_the_pixels(synthetic_coco):
    """Independent check of every normal annotation: its polygon rasterised by pycocotools gives the box and
    the area, and the pixels under it have its class' colour."""
    colour_of = {cid: np.array(col) for cid, _, col in SYNTHETIC_CATEGORIES}
    cat_ids = list(colour_of)
    checked = 0
    for split, _ in SPLIT_SIZES:
        data = _load(synthetic_coco, split)
        images = {img["id"]: img for img in data["images"]}
        for a in data["annotations"]:
            if a["iscrowd"]:
                continue
            img = images[a["image_id"]]
            h, w = img["height"], img["width"]
            assert isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 6
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
            np.testing.assert_allclose(mask_utils.toBbox(rle), a["bbox"])
            assert float(mask_utils.area(rle)) == a["area"]
            mask = cv2.erode(mask_utils.decode(rle), np.ones((5, 5), np.uint8)).astype(bool)
            rgb = cv2.imread(str(synthetic_coco / split / img["file_name"]))[..., ::-1]
            median = np.median(rgb[mask], axis=0)
            nearest = cat_ids[int(np.argmin([np.abs(colour_of[c] - median).sum() for c in cat_ids]))]
            assert nearest == a["category_id"]
            checked += 1
    assert checked >= 20


def test_cached_once_deterministic_and_keyed_by_parameters(tmp_path):
    a = synthetic_coco_root(tmp_path, num_train=4, num_val=2, seed=1)
    ann = a / "annotations" / "instances_train2017.json"
    stamp = ann.stat().st_mtime_ns
    assert synthetic_coco_root(tmp_path, num_train=4, num_val=2, seed=1) == a
    assert ann.stat().st_mtime_ns == stamp, "a complete copy is not rewritten"
    b = synthetic_coco_root(tmp_path, num_train=4, num_val=2, seed=2)
    assert b != a and b.parent == a.parent
    assert _load(b, "train2017") != _load(a, "train2017")
    c = write_synthetic_coco(tmp_path / "copy", num_train=4, num_val=2, seed=1)
    for split in ("train2017", "val2017"):
        assert _load(c, split) == _load(a, split)
    for name in (a / "train2017").iterdir():
        assert (c / "train2017" / name.name).read_bytes() == name.read_bytes()
    # One random stream per split: more training images leave the val split unchanged.
    d = synthetic_coco_root(tmp_path, num_train=6, num_val=2, seed=1)
    assert _load(d, "val2017")["images"] == _load(a, "val2017")["images"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (a, b, c, d))
    with pytest.raises(TypeError, match="colour"):
        synthetic_coco_root(tmp_path, colour="red")


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    root = write_synthetic_coco(tmp_path / "d", num_train=3, num_val=1, seed=0)
    before = _load(root, "train2017")
    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = synthetic._draw_image
    monkeypatch.setattr(synthetic, "_draw_image", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_coco(tmp_path / "d", num_train=3, num_val=1, seed=7)  # would replace the copy
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_coco(tmp_path / "new", num_train=3, num_val=1, seed=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"], "no temporary or partial folder is left"
    assert _load(root, "train2017") == before, "the complete copy is untouched"
    monkeypatch.undo()
    write_synthetic_coco(tmp_path / "d", num_train=3, num_val=1, seed=7)
    assert json.loads((root / "synthetic.json").read_text())["seed"] == 7
    assert _load(root, "train2017") != before


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="mine.*not a synthetic dataset"):
        write_synthetic_coco(tmp_path / "mine", num_train=2, num_val=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    root = write_synthetic_coco(tmp_path / "mine", num_train=2, num_val=1, overwrite=True)
    assert not (root / "notes.txt").exists() and (root / "annotations" / "instances_val2017.json").is_file()
    (tmp_path / "empty").mkdir()
    write_synthetic_coco(tmp_path / "empty", num_train=1, num_val=1)  # an empty folder is fine


def test_invalid_parameters():
    with pytest.raises(ValueError, match="image_size"):
        write_synthetic_coco("unused", image_size=(200, 100))
    with pytest.raises(ValueError, match="num_train"):
        write_synthetic_coco("unused", num_train=-1)
