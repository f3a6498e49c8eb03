"""Cityscapes: the label table and lookup tables against the official cityscapesscripts, the dataset on a
tiny synthetic Cityscapes-layout folder, and its errors (each names the file)."""

from __future__ import annotations

import copy
import re
import shutil

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers import labels as cs_labels
from cityscapesscripts.helpers.csHelpers import getCsFileInfo

from datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELS,
    CITYSCAPES_PALETTE,
    LABEL_ID_TO_TRAIN_ID,
    TRAIN_ID_TO_LABEL_ID,
    VALID_LABEL_IDS,
    CityscapesSegmentation,
    DatasetError,
    DatasetNotFoundError,
    build_segmentation_eval_transform,
    train_ids_to_label_ids,
    write_synthetic_cityscapes,
)


def test_label_table_is_the_official_one():
    assert len(CITYSCAPES_LABELS) == len(cs_labels.labels) == 35
    for ours, theirs in zip(CITYSCAPES_LABELS, cs_labels.labels):
        assert ours.name == theirs.name
        assert ours.id == theirs.id
        assert ours.train_id == theirs.trainId
        assert ours.category == theirs.category
        assert ours.category_id == theirs.categoryId
        assert ours.has_instances == theirs.hasInstances
        assert ours.ignore_in_eval == theirs.ignoreInEval
        assert tuple(ours.color) == tuple(theirs.color)
    evaluated = sorted((lab for lab in cs_labels.labels if not lab.ignoreInEval), key=lambda lab: lab.trainId)
    assert CITYSCAPES_CLASSES == tuple(lab.name for lab in evaluated)
    assert (
        len(CITYSCAPES_CLASSES) == 19
        and CITYSCAPES_CLASSES[0] == "road"
        and CITYSCAPES_CLASSES[-1] == "bicycle"
    )
    assert CITYSCAPES_PALETTE == tuple(tuple(lab.color) for lab in evaluated)


def test_lookup_tables_match_the_official_mapping():
    assert LABEL_ID_TO_TRAIN_ID.dtype == np.uint8 and LABEL_ID_TO_TRAIN_ID.shape == (256,)
    assert VALID_LABEL_IDS.dtype == bool and VALID_LABEL_IDS.shape == (256,)
    assert TRAIN_ID_TO_LABEL_ID.dtype == np.uint8 and TRAIN_ID_TO_LABEL_ID.shape == (19,)
    for value in range(256):
        lab = cs_labels.id2label.get(value)
        if lab is None:
            assert LABEL_ID_TO_TRAIN_ID[value] == 255 and not VALID_LABEL_IDS[value]
        else:
            expected = lab.trainId if 0 <= lab.trainId < 255 else 255
            assert LABEL_ID_TO_TRAIN_ID[value] == expected, lab.name
            assert VALID_LABEL_IDS[value]
    assert VALID_LABEL_IDS.sum() == 34
    for train_id, label_id in enumerate(TRAIN_ID_TO_LABEL_ID):
        assert cs_labels.trainId2label[train_id].id == label_id


def test_label_ids_train_ids_round_trip():
    rng = np.random.default_rng(0)
    label_ids = rng.integers(0, 34, size=(32, 48)).astype(np.uint8)
    train_ids = LABEL_ID_TO_TRAIN_ID[label_ids]
    back = train_ids_to_label_ids(train_ids)
    assert back.dtype == np.uint8 and back.shape == label_ids.shape
    evaluated = train_ids != 255
    np.testing.assert_array_equal(back[evaluated], label_ids[evaluated])
    assert (back[~evaluated] == 0).all(), (
        "ignored pixels are written as 'unlabeled' (the official eval rejects 255)"
    )
    np.testing.assert_array_equal(LABEL_ID_TO_TRAIN_ID[back], train_ids)
    np.testing.assert_array_equal(train_ids_to_label_ids(np.arange(19, dtype=np.int64)), TRAIN_ID_TO_LABEL_ID)
    with pytest.raises(ValueError, match="19"):
        train_ids_to_label_ids(np.array([[0, 19]]))
    with pytest.raises(ValueError, match="-1"):
        train_ids_to_label_ids(np.array([-1, 0]))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_synthetic_cityscapes(
        tmp_path_factory.mktemp("cs") / "cityscapes", num_train=4, num_val=2, height=64, width=128, seed=3
    )


@pytest.fixture
def copy_root(tiny_root, tmp_path):
    return shutil.copytree(tiny_root, tmp_path / "cityscapes")


def test_dataset_reads_the_official_layout(tiny_root):
    ds = CityscapesSegmentation(root=tiny_root, split="train")
    assert len(ds) == 4 and ds.num_classes == 19 and ds.ignore_index == 255
    assert ds.class_names == CITYSCAPES_CLASSES and ds.palette == CITYSCAPES_PALETTE
    paths = [ds.image_path(i) for i in range(len(ds))]
    assert paths == sorted(paths) and {p.parent.name for p in paths} == {"aachen", "bremen"}
    for i in range(len(ds)):
        image_info, mask_info = getCsFileInfo(str(ds.image_path(i))), getCsFileInfo(str(ds.mask_path(i)))
        assert (image_info.type, image_info.ext) == ("leftImg8bit", "png")
        assert (mask_info.type, mask_info.type2, mask_info.ext) == ("gtFine", "labelIds", "png")
        assert image_info[:3] == mask_info[:3]
        assert ds.image_path(i).parent.name == image_info.city
        assert ds.mask_path(i).parent.parent.name == "train" and ds.mask_path(i).parents[2].name == "gtFine"
        assert ds.output_name(i) == f"{image_info.city}_{image_info.sequenceNb}_{image_info.frameNb}"
        assert ds.prediction_file_name(i) == ds.image_path(i).name

        sample = ds[i]
        raw = cv2.imread(str(ds.mask_path(i)), cv2.IMREAD_UNCHANGED)
        rgb = cv2.imread(str(ds.image_path(i)))[..., ::-1]
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 64, 128)
        np.testing.assert_array_equal(sample["image"].permute(1, 2, 0).numpy(), rgb)
        assert sample["mask"].dtype == torch.uint8
        np.testing.assert_array_equal(sample["mask"].numpy(), LABEL_ID_TO_TRAIN_ID[raw])
        assert (sample["mask"].numpy() == 255).any() and set(np.unique(raw)) & {0, 1}
        assert sample["index"] == i and sample["orig_size"] == (64, 128) and sample["valid_size"] == (64, 128)
        np.testing.assert_array_equal(
            ds.label_ids_for_output(sample["mask"].numpy()), train_ids_to_label_ids(sample["mask"].numpy())
        )
    assert len(CityscapesSegmentation(root=tiny_root, split="val")) == 2


def test_eval_transform_keeps_the_full_resolution_mask(tiny_root):
    transform = build_segmentation_eval_transform(eval_size=(32, 64))
    ds = CityscapesSegmentation(root=tiny_root, split="val", transform=transform)
    sample = ds[-1]
    assert sample["index"] == 1
    assert sample["image"].shape == (3, 32, 64) and sample["valid_size"] == (32, 64)
    assert sample["mask"].shape == (64, 128) and sample["orig_size"] == (64, 128)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"leftImg8bit.train.*expected the Cityscapes layout"):
        CityscapesSegmentation(root=tmp_path, split="train")
    (tmp_path / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"no \*_leftImg8bit.png images"):
        CityscapesSegmentation(root=tmp_path, split="train")


def test_image_without_annotation(copy_root):
    ds = CityscapesSegmentation(root=copy_root, split="train")
    image, mask = ds.image_path(2), ds.mask_path(2)
    mask.unlink()
    with pytest.raises(DatasetError) as err:
        CityscapesSegmentation(root=copy_root, split="train")
    assert str(image) in str(err.value) and str(mask) in str(err.value)


def test_unknown_label_id_names_the_file_and_the_id(copy_root):
    ds = CityscapesSegmentation(root=copy_root, split="train")
    raw = cv2.imread(str(ds.mask_path(1)), cv2.IMREAD_UNCHANGED)
    raw[:3, :3] = 200
    raw[5, 5] = 34
    cv2.imwrite(str(ds.mask_path(1)), raw)
    with pytest.raises(DatasetError) as err:
        ds[1]
    message = str(err.value)
    assert str(ds.mask_path(1)) in message and "[34, 200]" in message
    unchecked = CityscapesSegmentation(root=copy_root, split="train", check_labels=False)
    assert (unchecked[1]["mask"][:3, :3] == 255).all()


def test_corrupt_files_and_bad_masks(copy_root):
    ds = CityscapesSegmentation(root=copy_root, split="train")
    ds.image_path(0).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(DatasetError, match=re.escape(str(ds.image_path(0))) + ".*corrupt"):
        ds[0]
    ds.mask_path(1).write_bytes(ds.mask_path(1).read_bytes()[:40])
    with pytest.raises(DatasetError, match="gtFine_labelIds.png.*corrupt") as err:
        ds[1]
    assert str(ds.mask_path(1)) in str(err.value)
    cv2.imwrite(str(ds.mask_path(2)), np.zeros((64, 128, 3), np.uint8))
    with pytest.raises(DatasetError, match="single-channel") as err:
        ds[2]
    assert str(ds.mask_path(2)) in str(err.value)
    cv2.imwrite(str(ds.mask_path(3)), np.zeros((32, 128), np.uint8))
    with pytest.raises(DatasetError, match="32x128") as err:
        ds[3]
    assert str(ds.mask_path(3)) in str(err.value)


def test_predictions_written_as_label_ids_pass_the_official_evaluation(tiny_root, tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    ds = CityscapesSegmentation(root=tiny_root, split="val")
    args = copy.copy(official.args)
    args.quiet, args.JSONOutput, args.evalPixelAccuracy = True, False, False
    args.evalInstLevelScore = False  # needs *_gtFine_instanceIds.png, which the generator does not write
    args.exportFile = str(tmp_path / "results.json")
    scores = []
    for spoil in (False, True):
        preds, gts = [], []
        for i in range(len(ds)):
            train_ids = ds[i]["mask"].numpy().copy()
            if spoil:
                train_ids[train_ids == 13] = 0  # cars predicted as road
            path = tmp_path / ds.prediction_file_name(i)
            cv2.imwrite(str(path), ds.label_ids_for_output(train_ids))
            preds.append(str(path))
            gts.append(str(ds.mask_path(i)))
        scores.append(official.evaluateImgLists(preds, gts, args))
    assert scores[0]["averageScoreClasses"] == pytest.approx(1.0)
    assert scores[1]["classScores"]["car"] == 0.0 and scores[1]["averageScoreClasses"] < 1.0
