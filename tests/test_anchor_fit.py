"""The anchor-fit report (heads/anchor_fit.py, tools/anchors.py): best IoUs against the full IoU matrix, shares
against a direct count, and a dataset of boxes no anchor covers getting a proposal that covers them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from heads import AnchorGenerator
from heads.anchor_fit import best_anchor_iou, fit_report, propose_anchors
from tasks.anchor_report import input_size, override_line

ROOT = Path(__file__).resolve().parent.parent
LEVELS = range(3, 8)


def _brute_best_iou(boxes: torch.Tensor, generator: AnchorGenerator, size: tuple[int, int]) -> torch.Tensor:
    """The best IoU of each box over every anchor, from the whole [N, A] matrix in float64."""
    anchors = generator({f"p{lvl}": (-(-size[0] // 2**lvl), -(-size[1] // 2**lvl)) for lvl in LEVELS},
                        dtype=torch.float64)
    b, a = boxes.double()[:, None], anchors[None]
    iw = (torch.minimum(b[..., 2], a[..., 2]) - torch.maximum(b[..., 0], a[..., 0])).clamp(min=0)
    ih = (torch.minimum(b[..., 3], a[..., 3]) - torch.maximum(b[..., 1], a[..., 1])).clamp(min=0)
    inter = iw * ih
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    return (inter / (area_b + area_a - inter)).amax(1)


def _random_boxes(g: torch.Generator, n: int, size: tuple[int, int], log_side: tuple[float, float] = (0.5, 5.5)):
    h, w = size
    centre = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64)
    lo, hi = log_side
    wh = torch.exp(lo + (hi - lo) * torch.rand(n, 2, generator=g, dtype=torch.float64))
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    keep = ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)
    return boxes[keep]


@pytest.mark.parametrize(("size", "scale", "ratios"), [((384, 640), 4.0, ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))),
                                                       ((256, 256), 1.5, ((0.3, 3.3), (2.0, 0.5))),
                                                       ((200, 136), 3.0, ((1.0, 1.0),))])
def test_best_anchor_iou_is_the_maximum_over_all_anchors(size, scale, ratios):
    g = torch.Generator().manual_seed(0)
    boxes = _random_boxes(g, 1500, size)
    generator = AnchorGenerator(anchor_scale=scale, aspect_ratios=ratios)
    fast = best_anchor_iou(boxes, generator, size, LEVELS, chunk=400)
    assert torch.allclose(fast, _brute_best_iou(boxes, generator, size), atol=1e-12, rtol=0)


def _shares(best: torch.Tensor, boxes: torch.Tensor, threshold: float) -> dict[str, tuple[int, float]]:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    masks = {"all": torch.ones_like(area, dtype=torch.bool), "small": area < 1024,
             "medium": (area >= 1024) & (area < 9216), "large": area >= 9216}
    return {k: (int(m.sum()), round(float((best[m] >= threshold).double().mean()), 4)) for k, m in masks.items()}


def test_fit_report_counts_as_a_direct_computation():
    size = (320, 320)
    boxes = _random_boxes(torch.Generator().manual_seed(1), 2000, size)
    generator = AnchorGenerator()
    report = fit_report(boxes, generator, size, LEVELS, threshold=0.5)
    best = _brute_best_iou(boxes, generator, size)
    for name, (n, share) in _shares(best, boxes, 0.5).items():
        assert report[name]["boxes"] == n > 0
        assert report[name]["share_iou_at_threshold"] == share
        assert report[name]["share_low_quality"] == round(float((best[_mask(boxes, name)] > 0).double().mean()), 4)


def _mask(boxes: torch.Tensor, name: str) -> torch.Tensor:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return {"all": area >= 0, "small": area < 1024, "medium": (area >= 1024) & (area < 9216), "large": area >= 9216}[name]


def _thin_boxes(g: torch.Generator, n: int, size: tuple[int, int]) -> torch.Tensor:
    """Boxes 8:1 or 1:8 (about 12 x 96 px): EfficientDet's anchors (at most 2:1) overlap none of them by IoU 0.5."""
    h, w = size
    long = 80 + 30 * torch.rand(n, generator=g, dtype=torch.float64)
    short = long / (7 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    vertical = torch.rand(n, generator=g) < 0.5
    bw, bh = torch.where(vertical, short, long), torch.where(vertical, long, short)
    cx = bw / 2 + torch.rand(n, generator=g, dtype=torch.float64) * (w - bw)
    cy = bh / 2 + torch.rand(n, generator=g, dtype=torch.float64) * (h - bh)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)


def test_proposal_covers_boxes_no_anchor_covers():
    size = (256, 256)
    boxes = _thin_boxes(torch.Generator().manual_seed(2), 3000, size)
    generator = AnchorGenerator()
    result = propose_anchors(boxes, generator, size, LEVELS, threshold=0.5, search_boxes=1000)
    before = result["current"]["all"]["share_iou_at_threshold"]
    after = result["proposed"]["all"]["share_iou_at_threshold"]
    assert before < 0.05 and after > 0.8
    # The proposal's share is that of a generator built from it, counted over all anchors.
    proposed = AnchorGenerator(anchor_scale=result["anchor_scale"], aspect_ratios=result["aspect_ratios"])
    assert after == round(float((_brute_best_iou(boxes, proposed, size) >= 0.5).double().mean()), 4)
    assert before == round(float((_brute_best_iou(boxes, generator, size) >= 0.5).double().mean()), 4)
    x, y = zip(*result["aspect_ratios"])
    assert min(np.divide(x, y)) < 0.2 and max(np.divide(x, y)) > 5  # thin anchors both ways
    # Boxes the current anchors already fit: the current settings stay.
    square = _random_boxes(torch.Generator().manual_seed(3), 500, size, log_side=(4.0, 4.6))
    kept = propose_anchors(square, generator, size, LEVELS, scales=[2.0, 4.0, 8.0])
    assert kept["current"]["all"]["share_iou_at_threshold"] == 1.0
    assert kept["anchor_scale"] == 4.0 and kept["aspect_ratios"] == [list(r) for r in generator.aspect_ratios]


def test_input_size_and_override_line():
    assert input_size(512) == (512, 512) and input_size([384, 640]) == (384, 640)
    with pytest.raises(ValueError, match="image_size"):
        input_size([1, 2, 3])
    assert override_line(2.83, [[1.0, 1.0], [0.35, 2.83]]) == (
        "anchors.anchor_scale=2.83 'anchors.aspect_ratios=[[1,1],[0.35,2.83]]'")


def _thin_coco(root: Path, n_images: int = 24) -> list[dict]:
    """A COCO-format folder (train2017 and val2017) of 300x200 images with thin boxes; returns the train annotations."""
    g = torch.Generator().manual_seed(4)
    anns: list[dict] = []
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        images, split_anns = [], []
        for i in range(n_images):
            cv2.imwrite(str(root / split / f"{i:04d}.jpg"), np.full((200, 300, 3), 127, np.uint8))
            images.append({"id": i + 1, "file_name": f"{i:04d}.jpg", "height": 200, "width": 300})
            for box in _thin_boxes(g, 3, (200, 300)).tolist():
                x1, y1, x2, y2 = box
                split_anns.append({"id": len(split_anns) + 1, "image_id": i + 1, "category_id": 1 + len(split_anns) % 2,
                                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": images, "annotations": split_anns,
            "categories": [{"id": 1, "name": "pole"}, {"id": 2, "name": "rail"}]}))
        if split == "train2017":
            anns = split_anns
    return anns


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "anchors.py"), *args], check=False, capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_anchors_tool_on_a_dataset_of_thin_boxes(tmp_path):
    anns = _thin_coco(tmp_path / "data")
    args = ["data=coco", f"data.root={tmp_path / 'data'}", "data.num_classes=2", "data.label_mode=contiguous",
            "model.image_size=256", "search_boxes=2000", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = _tool(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "anchors.json").read_text())
    # The boxes the tool fitted: each image (300x200) letterboxed into 256x256, scale min(256/200, 256/300).
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1) * min(256 / 200, 256 / 300)
    assert report["boxes"] == len(anns) and report["image_size"] == [256, 256] and report["levels"] == [3, 4, 5, 6, 7]
    current = AnchorGenerator(anchor_scale=4.0)
    proposed = AnchorGenerator(anchor_scale=report["anchor_scale"], aspect_ratios=report["aspect_ratios"])
    for name, gen in (("current", current), ("proposed", proposed)):
        best = _brute_best_iou(boxes, gen, (256, 256))
        for bucket, (n, share) in _shares(best, boxes, 0.5).items():
            assert report[name][bucket]["boxes"] == n
            if n:
                assert report[name][bucket]["share_iou_at_threshold"] == share
    assert report["current"]["all"]["share_iou_at_threshold"] < 0.1
    assert report["proposed"]["all"]["share_iou_at_threshold"] > 0.8
    assert report["override"] == override_line(report["anchor_scale"], report["aspect_ratios"])
    assert f"override: {report['override']}" in proc.stdout
    # The run directory holds a report already: an error, nothing overwritten.
    before = (tmp_path / "run" / "anchors.json").read_bytes()
    proc = _tool(*args)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "anchors.json").read_bytes() == before
