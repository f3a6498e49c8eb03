"""Bad input: every row of the table gets an error that names the file and the problem, and with
``skip_bad=True`` a warning that names the file and counts what was skipped.

Rows: 1 missing / empty data folder, 2 corrupt / truncated image, 3 malformed / incomplete annotation JSON,
4 annotation pointing to a missing image, 5 box outside the image / negative size, 6 unknown category id,
7 mask with an unknown label id / out-of-range value, 8 checkpoint of another model or class count,
9 unknown config key. Rows 8 and 9 are also covered elsewhere (tests/test_end_to_end.py,
tests/test_inference_tools.py); here only what they do not check.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datasets import (
    CityscapesSegmentation,
    CocoDetection,
    DatasetError,
    DatasetNotFoundError,
    SegmentationFolder,
    build_eval_transform,
    load_coco_annotations,
    write_synthetic_cityscapes,
)
from datasets._imageio import truncation

ROOT = Path(__file__).resolve().parent.parent
H, W = 40, 60


# ---------------------------------------------------------------------------------------------- helpers
def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like picture (smooth gradients and noise): JPEG-coded, its data fills the whole file."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 4, yy * 6, (xx + yy) * 3], -1) % 256
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _ann(ann_id: int, image_id: int, bbox, category_id: int = 1) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0,
            "area": 1.0}


def _coco(tmp_path: Path, annotations: list | None = None, *, n: int = 3, ext: str = ".jpg") -> Path:
    """A COCO-layout folder: ``n`` 60 x 40 images, one good box each (unless ``annotations`` is given)."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images = []
    for k in range(n):
        name = f"img{k}{ext}"
        assert cv2.imwrite(str(root / "val2017" / name), _picture(H, W, k))
        images.append({"id": k + 1, "file_name": name, "height": H, "width": W})
    if annotations is None:
        annotations = [_ann(10 + k, k + 1, [5, 5, 20, 10]) for k in range(n)]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}
    _json(root).write_text(json.dumps(data))
    return root


def _json(root: Path) -> Path:
    return root / "annotations" / "instances_val2017.json"


def _ds(root: Path, **kw) -> CocoDetection:
    return CocoDetection(image_dir=root / "val2017", ann_file=_json(root),
                         transform=build_eval_transform(image_size=64), **kw)


def _edit(root: Path, change) -> None:
    data = json.loads(_json(root).read_text())
    change(data)
    _json(root).write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def cityscapes_master(tmp_path_factory):
    return write_synthetic_cityscapes(
        tmp_path_factory.mktemp("bad_cs") / "cityscapes", num_train=3, num_val=2, height=32, width=64, seed=1
    )


@pytest.fixture
def cityscapes(cityscapes_master, tmp_path):
    return Path(shutil.copytree(cityscapes_master, tmp_path / "cityscapes"))


@pytest.fixture
def folder(tmp_path):
    """A segmentation folder: 3 images (jpg, png, jpg) with masks of classes 0..2 and ignore 255."""
    image_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    image_dir.mkdir()
    mask_dir.mkdir()
    rng = np.random.default_rng(0)
    for k, name in enumerate(("a.jpg", "b.png", "c.jpg")):
        assert cv2.imwrite(str(image_dir / name), _picture(24, 32, k))
        mask = rng.integers(0, 3, (24, 32)).astype(np.uint8)
        mask[:2] = 255
        assert cv2.imwrite(str(mask_dir / f"{Path(name).stem}.png"), mask)
    return image_dir, mask_dir


def _folder_ds(folder, **kw) -> SegmentationFolder:
    image_dir, mask_dir = folder
    return SegmentationFolder(image_dir=image_dir, mask_dir=mask_dir, class_names=["x", "y", "z"], **kw)


# ---------------------------------------------------------------------------------------------- 1. folders
def test_row1_detection_missing_or_empty_data_folder(tmp_path):
    from tasks.coco_datamodule import CocoDataModule

    dm = CocoDataModule(root=tmp_path / "nowhere", num_classes=2, image_size=64)
    with pytest.raises(DatasetNotFoundError) as err:
        dm.check()
    assert str(tmp_path / "nowhere" / "annotations" / "instances_train2017.json") in str(err.value)
    assert "does not exist" in str(err.value)
    (tmp_path / "empty").mkdir()  # exists, holds nothing
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "empty")) + ".*does not exist"):
        CocoDataModule(root=tmp_path / "empty", num_classes=2, image_size=64).check()

    with pytest.raises(DatasetNotFoundError, match="image folder not found: .*val2017"):
        _ds(tmp_path / "empty")
    root = _coco(tmp_path)
    for p in (root / "val2017").iterdir():
        p.unlink()
    with pytest.raises(DatasetNotFoundError) as err:  # the folder is there but empty: say so, not "img0.jpg"
        _ds(root)
    assert str(root / "val2017") in str(err.value)
    assert "image folder is empty" in str(err.value) and "instances_val2017.json lists 3 image(s)" in str(err.value)
    _edit(root, lambda d: d.update(images=[], annotations=[]))
    empty = r"instances_val2017.json: no image left to use \(its 'images' list is empty"
    with pytest.raises(DatasetError, match=empty):
        _ds(root)


def test_row1_segmentation_missing_or_empty_data_folder(tmp_path):
    from tasks.segmentation_datamodule import SegmentationDataModule

    images = re.escape(str(tmp_path / "leftImg8bit" / "train"))
    with pytest.raises(DatasetNotFoundError, match="image folder not found: " + images):
        CityscapesSegmentation(root=tmp_path, split="train")
    (tmp_path / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=images + r": no \*_leftImg8bit.png images"):
        CityscapesSegmentation(root=tmp_path, split="train")

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetNotFoundError, match="image folder not found: " + re.escape(str(tmp_path / "none"))):
        SegmentationFolder(image_dir=tmp_path / "none", mask_dir=tmp_path / "masks", class_names=["x"])
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "images")) + ": no images"):
        SegmentationFolder(image_dir=tmp_path / "images", mask_dir=tmp_path / "masks", class_names=["x"])

    for fmt, missing in (("cityscapes", "leftImg8bit"), ("folder", "images")):
        dm = SegmentationDataModule(root=tmp_path / "nowhere", num_classes=1, format=fmt, class_names=["x"])
        with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "nowhere" / missing / "train"))):
            dm.check()


# ---------------------------------------------------------------------------------------------- 2. images
@pytest.mark.parametrize("progressive", [False, True])
def test_row2_truncation_is_detected_before_decoding(progressive):
    """OpenCV < 5 decodes a JPEG cut in half without an error (grey bottom): the file itself is checked."""
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if progressive else []
    jpeg = cv2.imencode(".jpg", _picture(64, 96, 0), params)[1]
    png = cv2.imencode(".png", _picture(64, 96, 0))[1]
    for buf, name in ((jpeg, "JPEG"), (png, "PNG")):
        assert truncation(buf) is None
        for cut in (len(buf) // 2, len(buf) - 2, 200):
            assert name in truncation(buf[:cut])
    assert truncation(np.concatenate([jpeg, np.frombuffer(b"trailing junk", np.uint8)])) is None
    assert truncation(np.frombuffer(b"BM not a jpeg or png", np.uint8)) is None


def test_row2_data_after_the_end_of_an_image_is_not_a_truncation():
    """What follows a complete image is not looked at: a phone's motion-photo video after a JPEG (bytes that may
    hold a start-of-scan marker and no end marker after it), 200 kB after a PNG's IEND. An EXIF thumbnail (a whole
    JPEG inside the first segment) does not hide the main image's missing end."""
    jpeg = cv2.imencode(".jpg", _picture(64, 96, 0))[1].tobytes()
    png = cv2.imencode(".png", _picture(64, 96, 0))[1].tobytes()
    video = b"\x00\x00\x00\x18ftypmp42" + b"\xff\xda" + bytes(range(256)) * 800
    for image in (jpeg, png):
        data = np.frombuffer(image + video, np.uint8)
        assert truncation(data) is None
        assert cv2.imdecode(data, cv2.IMREAD_COLOR) is not None
    thumbnail = cv2.imencode(".jpg", _picture(8, 8, 1))[1].tobytes()
    app1 = b"Exif\x00\x00" + thumbnail
    with_exif = jpeg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpeg[2:]
    assert truncation(np.frombuffer(with_exif, np.uint8)) is None
    cut = np.frombuffer(with_exif[: len(with_exif) - 300], np.uint8)
    assert truncation(cut) == "a JPEG file without its end-of-image marker"
    frame = jpeg.index(b"\xff\xc0")  # stray bytes FF 00 before the frame header: decoders skip them
    stray = np.frombuffer(jpeg[:frame] + b"\xff\x00" + jpeg[frame:], np.uint8)
    assert cv2.imdecode(stray, cv2.IMREAD_COLOR) is not None and truncation(stray) is None


@pytest.mark.parametrize(
    "ext, damage, problem",
    [
        (".jpg", "corrupt", "cannot be decoded as an image"),
        (".jpg", "truncated", r"cannot be decoded as an image: truncated file \(a JPEG file without its end-of-image"),
        (".png", "truncated", r"cannot be decoded as an image: truncated file \(a PNG file without its IEND chunk"),
    ],
)
def test_row2_detection_corrupt_or_truncated_image(tmp_path, caplog, ext, damage, problem):
    root = _coco(tmp_path, ext=ext)
    bad = root / "val2017" / f"img1{ext}"
    if damage == "corrupt":
        bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    else:
        _truncate(bad)
    ds = _ds(root)
    ds[0]
    with pytest.raises(DatasetError, match=re.escape(str(bad)) + ": " + problem):
        ds[1]

    with caplog.at_level(logging.WARNING):
        skipping = _ds(root, skip_bad=True)
        first = skipping[1]
        again = skipping[1]
    assert first["image_id"] == again["image_id"] == 3  # the next readable image, every time
    assert torch.equal(first["image"], ds[2]["image"])
    warnings = [w for w in _warnings(caplog) if str(bad) in w]
    assert len(warnings) == 1 and re.search(problem, warnings[0]) and "skip_bad" in warnings[0]
    assert [skipping[i]["image_id"] for i in range(3)] == [1, 3, 3]

    for k in (0, 2):  # nothing readable left: an error, not an endless search
        _truncate(root / "val2017" / f"img{k}{ext}")
    with pytest.raises(DatasetError, match=r"instances_val2017.json: none of the 3 samples can be read"):
        _ds(root, skip_bad=True)[0]


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_row2_segmentation_corrupt_or_truncated_image(cityscapes, folder, caplog, damage):
    def spoil(path: Path) -> None:
        if damage == "corrupt":
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 + b"IEND\xaeB`\x82")
        else:
            _truncate(path)

    problem = r"cannot be decoded as an image" + (": truncated file" if damage == "truncated" else r" \(corrupt")
    cs = CityscapesSegmentation(root=cityscapes, split="train")
    spoil(cs.image_path(0))
    spoil(cs.mask_path(2))
    for i, path in ((0, cs.image_path(0)), (2, cs.mask_path(2))):
        with pytest.raises(DatasetError, match=re.escape(str(path)) + ": " + problem):
            cs[i]
    fd = _folder_ds(folder)
    spoil(fd.image_path(0))  # a.jpg
    with pytest.raises(DatasetError, match=re.escape(str(fd.image_path(0))) + ": " + problem):
        fd[0]

    with caplog.at_level(logging.WARNING):
        cs_skip = CityscapesSegmentation(root=cityscapes, split="train", skip_bad=True)
        assert [cs_skip[i]["index"] for i in range(3)] == [1, 1, 1]  # 0 -> 1, 2 -> (wraps) 0 -> 1
        assert _folder_ds(folder, skip_bad=True)[0]["index"] == 1
    warned = " ".join(_warnings(caplog))
    for path in (cs.image_path(0), cs.mask_path(2), fd.image_path(0)):
        assert str(path) in warned


# ---------------------------------------------------------------------------------------------- 3. JSON
def test_row3_malformed_annotation_json(tmp_path):
    root = _coco(tmp_path)
    _json(root).write_text("images: [not json at all")
    for skip_bad in (False, True):  # nothing to skip: an error either way
        with pytest.raises(DatasetError, match=re.escape(str(_json(root))) + ": not a readable JSON file"):
            _ds(root, skip_bad=skip_bad)
    _json(root).write_text("[1, 2, 3]")
    with pytest.raises(DatasetError, match="instances_val2017.json: expected a JSON object"):
        _ds(root)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_row3_annotation_json_without_a_section(tmp_path, key):
    root = _coco(tmp_path)
    _edit(root, lambda d: d.pop(key))
    for skip_bad in (False, True):
        with pytest.raises(DatasetError, match=re.escape(str(_json(root))) + f": missing or invalid '{key}' list"):
            _ds(root, skip_bad=skip_bad)
    with pytest.raises(DatasetError, match=f"missing or invalid '{key}'"):
        load_coco_annotations(_json(root))  # the evaluator's loader: the same check


@pytest.mark.parametrize("field", ["bbox", "image_id", "category_id"])
def test_row3_annotation_without_a_field(tmp_path, caplog, field):
    root = _coco(tmp_path)
    _edit(root, lambda d: d["annotations"][1].pop(field))
    with pytest.raises(DatasetError) as err:
        _ds(root)
    assert str(_json(root)) in str(err.value)
    assert f"annotations[1] needs id, image_id, category_id and bbox (it has no {field})" in str(err.value)
    with caplog.at_level(logging.WARNING):
        ds = _ds(root, skip_bad=True)
    assert _warnings(caplog) == [f"{_json(root)}: skipped 1 annotation (1 no {field}) (data.skip_bad=true)"]
    assert len(ds) == 3 and [len(ds.targets(i)[1]) for i in range(3)] == [1, 0, 1]
    assert sorted(ds.coco.anns) == [10, 12]  # the evaluator's ground truth skips it too


# ---------------------------------------------------------------------------------------------- 4. missing image
def test_row4_annotation_pointing_to_a_missing_image(tmp_path, caplog):
    root = _coco(tmp_path)
    (root / "val2017" / "img1.jpg").unlink()
    ds = _ds(root)
    with pytest.raises(DatasetNotFoundError) as err:
        ds[1]
    assert str(root / "val2017" / "img1.jpg") in str(err.value)
    assert "listed in instances_val2017.json (id 2) does not exist" in str(err.value)

    with caplog.at_level(logging.WARNING):
        ds = _ds(root, skip_bad=True)
    assert _warnings(caplog) == [f"{_json(root)}: skipped 1 image (1 missing file) (data.skip_bad=true)"]
    assert len(ds) == 2 and ds.image_ids == [1, 3] and [ds[i]["image_id"] for i in range(2)] == [1, 3]
    assert sorted(ds.coco.imgs) == [1, 3] and sorted(ds.coco.anns) == [10, 12]

    (root / "val2017" / "img0.jpg").unlink()
    (root / "val2017" / "img2.jpg").unlink()
    (root / "val2017" / "unrelated.txt").write_text("")
    with pytest.raises(DatasetError, match=r"instances_val2017.json: no image left to use \(.*3 missing file"):
        _ds(root, skip_bad=True)


# ---------------------------------------------------------------------------------------------- 5. boxes
@pytest.mark.parametrize(
    "bbox, problem",
    [
        (
            [70, 5, 10, 10],
            r"has a box \[70, 5, 10, 10\] \(x, y, w, h\) entirely outside its image \(image id 2: 60 wide, 40 high\)",
        ),
        ([-30, 5, 20, 10], r"has a box \[-30, 5, 20, 10\] .*entirely outside its image"),
        ([5, 41, 10, 10], r"has a box \[5, 41, 10, 10\] .*entirely outside its image"),
        ([5, 5, -3, 10], r"has a negative box size \[5, 5, -3, 10\]"),
        ([5, 5, 10, -0.5], "has a negative box size"),
    ],
)
def test_row5_box_outside_the_image_or_negative_size(tmp_path, caplog, bbox, problem):
    root = _coco(tmp_path)
    _edit(root, lambda d: d["annotations"][1].update(bbox=bbox))
    with pytest.raises(DatasetError, match=re.escape(str(_json(root))) + ": annotation id 11 " + problem):
        _ds(root)
    reason = "negative box size" if "negative" in problem else "box outside the image"
    with caplog.at_level(logging.WARNING):
        ds = _ds(root, skip_bad=True)
    assert _warnings(caplog) == [f"{_json(root)}: skipped 1 annotation (1 {reason}) (data.skip_bad=true)"]
    assert [len(ds.targets(i)[1]) for i in range(3)] == [1, 0, 1]


def test_row5_boxes_crossing_or_touching_the_border_are_normal(tmp_path, caplog):
    anns = [_ann(1, 1, [50, 30, 20, 20]), _ann(2, 1, [-5, -5, 15, 10]), _ann(3, 1, [60, 5, 0, 10])]
    root = _coco(tmp_path, anns, n=1)
    with caplog.at_level(logging.WARNING):
        ds = _ds(root)
    boxes, _ = ds.targets(0)
    np.testing.assert_allclose(boxes, [[50, 30, 60, 40], [0, 0, 10, 5]])  # clipped; the no-area one dropped
    assert ds.num_degenerate == 1 and not any("skipped" in w for w in _warnings(caplog))


# ---------------------------------------------------------------------------------------------- 6. categories
def test_row6_unknown_category_id(tmp_path, caplog):
    root = _coco(tmp_path)
    _edit(root, lambda d: d["annotations"][2].update(category_id=7))
    with pytest.raises(DatasetError) as err:
        _ds(root)
    assert str(err.value) == (
        f"{_json(root)}: annotation id 12 has category id 7, which is not in the categories list"
    )
    with caplog.at_level(logging.WARNING):
        ds = _ds(root, skip_bad=True)
    assert _warnings(caplog) == [f"{_json(root)}: skipped 1 annotation (1 unknown category id) (data.skip_bad=true)"]
    assert ds.num_classes == 2 and [len(ds.targets(i)[1]) for i in range(3)] == [1, 1, 0]


def test_skip_bad_counts_everything_in_one_warning(tmp_path, caplog):
    """The issue's example: one warning per dataset, counts by reason; targets and ground truth agree."""
    anns = [
        _ann(1, 1, [5, 5, 20, 10]),
        _ann(2, 1, [80, 5, 10, 10]),  # outside
        _ann(3, 2, [5, 50, 10, 10]),  # outside
        _ann(4, 2, [5, 5, 10, 10], category_id=2),  # unknown category
        _ann(5, 3, [5, 5, 10, 10]),  # its image is missing
        _ann(6, 2, [1, 1, 30, 30], category_id=3),
    ]
    root = _coco(tmp_path, anns)
    (root / "val2017" / "img2.jpg").unlink()
    with pytest.raises(DatasetError, match="annotation id 4 has category id 2"):  # without skip_bad: the first
        _ds(root)
    with caplog.at_level(logging.WARNING):
        ds = _ds(root, skip_bad=True)
    assert _warnings(caplog) == [
        (
            f"{_json(root)}: skipped 3 annotations (2 box outside the image, 1 unknown category id) and "
            "1 image (1 missing file) (data.skip_bad=true)"
        )
    ]
    assert ds.skipped["annotations"] == {"box outside the image": 2, "unknown category id": 1}
    assert ds.image_ids == [1, 2] and [ds.targets(i)[1].tolist() for i in range(2)] == [[0], [1]]
    assert sorted(ds.coco.anns) == [1, 6] and sorted(ds.coco.imgs) == [1, 2]
    clone = pickle.loads(pickle.dumps(ds))  # a loader worker; the evaluator may reload the ground truth
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert sorted(clone.coco.anns) == [1, 6] and sorted(clone.coco.imgs) == [1, 2]
    assert _warnings(caplog) == []  # reported once, when the dataset was built


# ---------------------------------------------------------------------------------------------- 7. masks
def test_row7_cityscapes_mask_with_an_unknown_label_id(cityscapes, caplog):
    ds = CityscapesSegmentation(root=cityscapes, split="train")
    mask = cv2.imread(str(ds.mask_path(1)), cv2.IMREAD_UNCHANGED)
    mask[0, :3] = 77
    cv2.imwrite(str(ds.mask_path(1)), mask)
    with pytest.raises(DatasetError) as err:
        ds[1]
    assert str(err.value).startswith(f"{ds.mask_path(1)}: mask holds invalid value(s) [77]; not label ids")
    with caplog.at_level(logging.WARNING):
        skipping = CityscapesSegmentation(root=cityscapes, split="train", skip_bad=True)
        sample = skipping[1]
    assert sample["index"] == 2 and torch.equal(sample["mask"], ds[2]["mask"])
    (warning,) = _warnings(caplog)
    assert str(cityscapes / "leftImg8bit" / "train") in warning
    assert f"{ds.mask_path(1)}: mask holds invalid value(s) [77]" in warning


def test_row7_folder_mask_with_an_out_of_range_value(folder, caplog):
    ds = _folder_ds(folder)
    mask = cv2.imread(str(ds.mask_path(2)), cv2.IMREAD_UNCHANGED)
    mask[5, 5] = 3  # classes are 0..2, ignore 255
    cv2.imwrite(str(ds.mask_path(2)), mask)
    with pytest.raises(DatasetError) as err:
        ds[2]
    assert str(err.value) == (
        f"{ds.mask_path(2)}: mask holds invalid value(s) [3]; expected class indices 0..2 or the ignore value 255"
    )
    with caplog.at_level(logging.WARNING):
        assert _folder_ds(folder, skip_bad=True)[2]["index"] == 0  # wraps around to the first
    assert any(str(ds.mask_path(2)) in w for w in _warnings(caplog))


def test_images_without_masks_are_skipped_and_counted(cityscapes, folder, caplog):
    cs = CityscapesSegmentation(root=cityscapes, split="train")
    cs.mask_path(0).unlink()
    fd = _folder_ds(folder)
    fd.mask_path(1).unlink()
    no_annotation = f"{cs.image_path(0)}: its annotation {cs.mask_path(0)} does not exist"
    with pytest.raises(DatasetError, match=re.escape(no_annotation)):
        CityscapesSegmentation(root=cityscapes, split="train")
    with caplog.at_level(logging.WARNING):
        assert len(CityscapesSegmentation(root=cityscapes, split="train", skip_bad=True)) == 2
        assert len(_folder_ds(folder, skip_bad=True)) == 2
    assert _warnings(caplog) == [
        f"{cityscapes / 'leftImg8bit' / 'train'}: skipped 1 image (1 no annotation) (data.skip_bad=true)",
        f"{folder[0]}: skipped 1 image (1 no mask) (data.skip_bad=true)",
    ]


# ---------------------------------------------------------------------------------------------- configs
def test_skip_bad_is_a_config_option_passed_to_the_datasets(synthetic_coco, cityscapes):
    from hydra.utils import instantiate

    from tasks.config import compose

    assert compose("train", ["data=synthetic"]).data.skip_bad is False
    assert compose("train", ["task=segmentation", "data=folder", "data.class_names=[a]"]).data.skip_bad is False
    det = instantiate(compose("train", [f"data.root={synthetic_coco}", "data.num_classes=4",
                                        "data.label_mode=contiguous", "data.skip_bad=true"]).data)
    seg = instantiate(compose("train", ["task=segmentation", f"data.root={cityscapes}", "data.skip_bad=true"]).data)
    for dm in (det, seg):
        dm.setup("validate")
        assert dm.val_dataset.skip_bad is True


# ---------------------------------------------------------------------------------------------- 8. checkpoints
def test_row8_checkpoint_of_another_class_count(tmp_path):
    """Another model (neck width) and unreadable files: tests/test_end_to_end.py, tests/test_inference_tools.py."""
    from hydra.utils import instantiate

    from tasks.config import compose
    from tasks.runner import CheckpointError, load_checkpoint_weights

    tiny = ["neck.channels=16", "neck.num_repeats=1", "head.depth=1"]
    three = instantiate(compose("train", [*tiny, "data.num_classes=3"]).model)
    path = tmp_path / "three_classes.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in three.state_dict().items()}}, path)
    five = instantiate(compose("train", [*tiny, "data.num_classes=5"]).model)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_weights(five, path)
    assert str(path) in str(err.value) and "data.num_classes" in str(err.value) and "shape" in str(err.value)


# ---------------------------------------------------------------------------------------------- 9. config keys
def test_row9_unknown_config_key_is_an_error():
    from hydra.errors import ConfigCompositionException

    from tasks.config import compose

    with pytest.raises(ConfigCompositionException) as err:
        compose("train", ["data=synthetic", "data.batch_sze=4"])
    assert "data.batch_sze" in str(err.value)


@pytest.mark.slow
def test_row9_unknown_config_key_on_the_command_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "data=synthetic", "data.batch_sze=4",
           f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "Could not override 'data.batch_sze'" in proc.stderr and "Key 'batch_sze' is not in struct" in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # failed before doing anything


class _RaisesInWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise DatasetError(f"/data/img{i}.jpg: cannot be decoded as an image (corrupt or truncated file?)")


def test_an_error_in_a_loader_worker_is_reported_as_its_own_line():
    """PyTorch re-raises a worker's error with the worker's traceback in its message; the tools print the original
    message, which names the file, on one line."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from _common import one_line

    loader = torch.utils.data.DataLoader(_RaisesInWorker(), num_workers=1, batch_size=None)
    with pytest.raises(DatasetError) as err:
        next(iter(loader))
    assert "Traceback" in str(err.value)  # what PyTorch hands over
    assert one_line(err.value) == ("/data/img0.jpg: cannot be decoded as an image (corrupt or truncated file?) "
                                   "(in a data-loader worker)")
    assert one_line(DatasetError("plain message")) == "plain message"
