"""tools/show_data.py: contact sheets as the loader delivers the samples, and counts equal to the dataset's own
annotations (detection: COCO format; segmentation: a mask folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.inspection import contact_sheet, draw_tile

ROOT = Path(__file__).resolve().parent.parent


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "show_data.py"), *args], check=False,
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _expected_detection_stats(root: Path) -> dict:
    """Counts and sizes straight from the annotation file: non-crowd boxes clipped to their image."""
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    per_class: Counter = Counter()
    widths, heights, with_objects = [], [], set()
    for a in data["annotations"]:
        if a.get("iscrowd"):
            continue
        h, w = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        bw, bh = min(x + bw, w) - max(x, 0), min(y + bh, h) - max(y, 0)
        assert bw >= 1 and bh >= 1  # the synthetic data has no degenerate boxes
        per_class[names[a["category_id"]]] += 1
        widths.append(bw)
        heights.append(bh)
        with_objects.add(a["image_id"])
    area = np.multiply(widths, heights)
    return {
        "per_class": {names[c]: per_class[names[c]] for c in sorted(names)},
        "images": len(data["images"]), "images_without_objects": len(data["images"]) - len(with_objects),
        "crowd": sum(bool(a.get("iscrowd")) for a in data["annotations"]),
        "small": int((area < 32**2).sum()), "medium": int(((area >= 32**2) & (area < 96**2)).sum()),
        "large": int((area >= 96**2).sum()), "width_p50": float(np.quantile(widths, 0.5)),
        "aspect_p95": float(np.quantile(np.divide(widths, heights), 0.95)),
    }


@pytest.mark.parametrize("augment", [False, True])
def test_show_data_detection(synthetic_coco, tmp_path, augment):
    out = tmp_path / "run"
    args = ["data=coco", f"data.root={synthetic_coco}", "data.num_classes=4", "data.label_mode=contiguous",
            "model.image_size=128", "n=6", "columns=2", "rows=2", "tile_size=128", f"augment={augment}",
            f"hydra.run.dir={out}"]
    proc = _tool(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "data_stats.json").read_text())
    expected = _expected_detection_stats(synthetic_coco)
    assert stats["per_class"] == expected["per_class"] and stats["objects"] == sum(expected["per_class"].values())
    assert stats["images"] == expected["images"] == 16
    assert stats["images_without_objects"] == expected["images_without_objects"] > 0
    assert stats["crowd_left_out"] == expected["crowd"] > 0 and stats["degenerate_left_out"] == 0
    assert stats["size_buckets"] == {k: expected[k] for k in ("small", "medium", "large")}
    assert stats["width"]["p50"] == pytest.approx(expected["width_p50"], abs=1e-3)
    assert stats["aspect_w_over_h"]["p95"] == pytest.approx(expected["aspect_p95"], abs=1e-3)
    for name, count in expected["per_class"].items():
        assert f"{name}" in proc.stdout and str(count) in proc.stdout
    # Six samples on sheets of 2x2: two sheets, the second with one row of two; 128-px tiles (the images are square).
    assert stats["sheets"] == ["sheet_000.png", "sheet_001.png"] and len(stats["shown"]) == 6
    first, second = (cv2.imread(str(out / name)) for name in stats["sheets"])
    assert first.shape == (2 * 132 + 4, 2 * 132 + 4, 3) and second.shape == (132 + 4, 2 * 132 + 4, 3)
    assert first[10:120, 10:120].std() > 5  # a picture, not the empty grid
    # Nothing is overwritten: the same run directory again is an error.
    before = (out / "sheet_000.png").read_bytes()
    proc = _tool(*args)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "sheet_000.png").read_bytes() == before


def test_show_data_segmentation_folder(tmp_path):
    """Pixel counts equal the masks' own: three 40x60 images with masks of classes 0-2 and ignored (255) pixels."""
    rng = np.random.default_rng(0)
    counts = np.zeros(256, dtype=np.int64)
    for split in ("train", "val"):
        (tmp_path / "data" / "images" / split).mkdir(parents=True)
        (tmp_path / "data" / "masks" / split).mkdir(parents=True)
        for i in range(3):
            mask = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(40, 60), p=[0.5, 0.3, 0.1, 0.1])
            cv2.imwrite(str(tmp_path / "data" / "images" / split / f"{i}.png"),
                        rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
            cv2.imwrite(str(tmp_path / "data" / "masks" / split / f"{i}.png"), mask)
            if split == "train":
                counts += np.bincount(mask.reshape(-1), minlength=256)
    out = tmp_path / "run"
    proc = _tool("task=segmentation", "data=folder", f"data.root={tmp_path / 'data'}", "data.class_names=[sky,road,car]",
                 "data.crop_size=[32,32]", "augment=true", "n=3", "columns=3", "rows=1", "tile_size=64",
                 f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["per_class"] == {"sky": int(counts[0]), "road": int(counts[1]), "car": int(counts[2])}
    assert stats["ignored_pixels"] == int(counts[255]) and stats["pixels"] == 3 * 40 * 60
    assert stats["per_class_share"]["sky"] == pytest.approx(counts[0] / counts[:3].sum(), abs=1e-6)
    sheet = cv2.imread(str(out / "sheet_000.png"))
    assert sheet.shape == (64 + 8, 3 * 68 + 4, 3)  # augmented 32x32 crops drawn at 64 px


def test_tiles_and_sheets():
    image = np.zeros((50, 100, 3), np.uint8)
    tile = draw_tile(image, ["a", "b"], tile_size=200, boxes=np.array([[10.0, 10, 30, 40]]), labels=np.array([1]))
    assert tile.shape == (100, 200, 3) and tile[20:80, 20:60].any()  # scaled x2, the box drawn at that scale
    mask = np.full((50, 100), 255, np.uint8)
    mask[:, :50] = 0
    tile = draw_tile(image, ["a"], tile_size=100, mask=mask)
    assert tile[:, :50].any() and not tile[:, 50:].any()  # colour where the class is, the image where it is ignored
    sheet = contact_sheet([tile, tile[:20, :30], tile], columns=2, gap=2)
    assert sheet.shape == (2 * 52 + 2, 2 * 102 + 2, 3)
