"""ADE20K (ADEChallengeData2016 layout) read through the folder format: 150 classes, mask value 0 ignored, value k is
class k-1; trained for a few steps and evaluated, prediction PNGs written back in the dataset's values."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra.utils import instantiate

from datasets.errors import DatasetError
from tasks.config import compose
from tasks.runner import train

# Mask values used by the generated scenes (class = value - 1); 0 is "other", not labelled.
VALUES = (1, 3, 13, 150)


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of flat coloured rectangles and its mask: each rectangle one value of VALUES, the rest 0."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for value in VALUES:
        y, x = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
        mask[y : y + int(rng.integers(12, h // 2)), x : x + int(rng.integers(12, w // 2))] = value
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[list(VALUES)] = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 220, 60)]
    image = colours[mask] + rng.integers(0, 30, (h, w, 3), dtype=np.uint8)
    return image, mask


def write_ade20k(root: Path, *, train: int = 4, val: int = 3, seed: int = 0) -> Path:
    """``root/ADEChallengeData2016`` with ``train`` + ``val`` small scenes in the official layout."""
    rng = np.random.default_rng(seed)
    data = root / "ADEChallengeData2016"
    for split, count, prefix in (("training", train, "ADE_train"), ("validation", val, "ADE_val")):
        (data / "images" / split).mkdir(parents=True)
        (data / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            h, w = (64, 96) if i % 2 == 0 else (80, 64)  # images of several sizes, as in ADE20K
            image, mask = _scene(rng, h, w)
            name = f"{prefix}_{i + 1:08d}"
            cv2.imwrite(str(data / "images" / split / f"{name}.jpg"), image[:, :, ::-1])
            cv2.imwrite(str(data / "annotations" / split / f"{name}.png"), mask)
    return data


def _overrides(data: Path, tmp_path: Path) -> list[str]:
    return [
        "task=segmentation", "data=ade20k", f"data.root={data}", f"cache_dir={tmp_path / 'cache'}",
        "backbone=timm", "backbone.name=test_efficientnet", "neck.channels=16", "neck.num_repeats=1",
        "data.crop_size=[64,64]", "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=4",
        "task.module.precise_bn.enabled=false", "logger=csv",
    ]


def test_ade20k_config_is_the_folder_format_with_its_label_values():
    cfg = compose("train", ["task=segmentation", "data=ade20k"])
    assert cfg.data.format == "folder" and cfg.data.num_classes == 150 and len(set(cfg.data.class_names)) == 150
    assert (cfg.data.class_names[0], cfg.data.class_names[12], cfg.data.class_names[149]) == ("wall", "person", "flag")
    assert (cfg.data.ignore_index, cfg.data.label_offset) == (0, 1)
    assert (cfg.data.train_split, cfg.data.val_split) == ("training", "validation")


@pytest.mark.slow
def test_ade20k_trains_and_evaluates_without_the_ignored_pixels(tmp_path):
    data = write_ade20k(tmp_path)
    run = tmp_path / "run"
    result = train(compose("train", _overrides(data, tmp_path)), run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["images"] == 3 and metrics["data"]["split"] == "validation"
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["mIoU"] == pytest.approx(result["metrics"]["mIoU"], abs=1e-12)
    per_class = metrics["per_class"]
    assert len(per_class) == 150 and list(per_class)[:2] == ["wall", "building"]
    # The ground truth the metrics counted: every pixel except value 0, value k as class k-1.
    gts = {p.stem: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((data / "annotations" / "validation").glob("*.png"))}
    counted = np.bincount(np.concatenate([g[g > 0].ravel() - 1 for g in gts.values()]), minlength=150)
    assert [v["num_gt_pixels"] for v in per_class.values()] == counted.tolist()
    assert sum(counted) < sum(g.size for g in gts.values())  # the scenes do hold ignored pixels
    # Prediction PNGs hold the dataset's values (class + 1, never 0); the mIoU computed from them, ignoring 0, is ours.
    confusion = np.zeros((150, 150), dtype=np.int64)
    for stem, gt in gts.items():
        pred = cv2.imread(str(run / "predictions" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert pred.shape == gt.shape and pred.min() >= 1 and pred.max() <= 150
        keep = gt > 0
        np.add.at(confusion, (gt[keep].astype(int) - 1, pred[keep].astype(int) - 1), 1)
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    assert metrics["mIoU"] == pytest.approx(float(np.mean(tp[union > 0] / union[union > 0])), abs=1e-12)
    for k, (name, values) in enumerate(per_class.items()):
        assert (values["IoU"] is None) == (union[k] == 0), name


def test_an_ade20k_mask_value_beyond_150_is_an_error_naming_the_file(tmp_path):
    data = write_ade20k(tmp_path, train=1, val=2)
    bad = data / "annotations" / "validation" / "ADE_val_00000002.png"
    mask = cv2.imread(str(bad), cv2.IMREAD_UNCHANGED)
    mask[0, :3] = 151
    cv2.imwrite(str(bad), mask)
    dm = instantiate(compose("train", _overrides(data, tmp_path)).data)
    dm.setup("validate")
    dm.val_dataset[0]  # a good file reads
    with pytest.raises(DatasetError) as err:
        dm.val_dataset[1]
    assert str(err.value) == (f"{bad}: mask holds invalid value(s) [151]; expected values 1..150 (class index + 1) or "
                              "the ignore value 0")


def test_label_offset_maps_values_both_ways_and_rejects_an_ignore_value_among_the_classes(tmp_path):
    from datasets import SegmentationFolder

    data = write_ade20k(tmp_path, train=1, val=1)
    folders = {"image_dir": data / "images" / "validation", "mask_dir": data / "annotations" / "validation"}
    names = [f"c{k}" for k in range(150)]
    ds = SegmentationFolder(**folders, class_names=names, ignore_index=0, label_offset=1)
    raw = cv2.imread(str(ds.mask_path(0)), cv2.IMREAD_UNCHANGED)
    mask = ds[0]["mask"].numpy()
    np.testing.assert_array_equal(mask, np.where(raw == 0, 255, raw.astype(np.int64) - 1))
    np.testing.assert_array_equal(ds.label_ids_for_output(np.array([[0, 12, 149]])), [[1, 13, 150]])
    with pytest.raises(ValueError, match=r"ignore_index must be in 0..255 and not one of the class values 1..150"):
        SegmentationFolder(**folders, class_names=names, ignore_index=150, label_offset=1)
    with pytest.raises(ValueError, match=r"label_offset=107: the 150 class values 107..256 must fit 0..255"):
        SegmentationFolder(**folders, class_names=names, ignore_index=0, label_offset=107)
