"""Detection pipelines: exact eval mapping and its inverse, train invariants, label alignment, flips,
per-worker randomness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datasets import DetectionTransform, build_eval_transform, build_train_transform


def test_eval_resize_pad_by_hand():
    # A 100 (wide) x 50 (high) image; image_size 64 -> scale 0.64, content 64 x 32, padded below.
    img = np.full((50, 100, 3), 200, np.uint8)
    out = build_eval_transform(image_size=64)(img, np.array([[10, 10, 30, 40]], np.float32), np.array([3]))
    assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
    assert out["scale"] == pytest.approx(0.64, abs=1e-12)
    np.testing.assert_allclose(out["boxes"], [[6.4, 6.4, 19.2, 25.6]], atol=1e-5)
    assert out["boxes"].dtype == np.float32
    assert out["labels"].tolist() == [3] and out["labels"].dtype == np.int64
    assert (out["image"][:32] == 200).all() and (out["image"][32:] == 0).all()
    np.testing.assert_allclose(out["boxes"] / out["scale"], [[10, 10, 30, 40]], atol=1e-4)


def test_eval_tall_image_pads_right_and_upscales():
    img = np.full((32, 16, 3), 7, np.uint8)  # 16 wide, 32 high -> x4 -> 64 x 128
    out = build_eval_transform(image_size=128)(img, np.array([[2, 3, 6, 9]], np.float32), np.array([0]))
    assert out["image"].shape == (128, 128, 3) and out["scale"] == 4.0
    assert (out["image"][:, :64] == 7).all() and (out["image"][:, 64:] == 0).all()
    np.testing.assert_allclose(out["boxes"], [[8, 12, 24, 36]])


def test_eval_inverse_mapping_round_trip():
    rng = np.random.default_rng(0)
    t = build_eval_transform(image_size=96)
    for h, w in [(37, 91), (480, 640), (96, 96), (300, 41)]:
        x0, y0 = rng.uniform(0, w - 8, 10), rng.uniform(0, h - 8, 10)
        boxes = np.stack([x0, y0, rng.uniform(x0 + 4, w), rng.uniform(y0 + 4, h)], 1).astype(np.float32)
        out = t(np.zeros((h, w, 3), np.uint8), boxes, np.arange(10))
        assert out["scale"] == pytest.approx(96 / max(h, w))
        assert out["image"].shape == (96, 96, 3)
        kept = out["labels"]  # boxes under 1 output pixel are dropped; the rest map back exactly
        np.testing.assert_allclose(out["boxes"] / out["scale"], boxes[kept], rtol=1e-5, atol=1e-3)
        widths = (boxes[:, 2:] - boxes[:, :2]).min(1) * out["scale"]
        assert set(kept.tolist()) == set(np.flatnonzero(widths >= 1).tolist())


def test_eval_clips_and_drops_boxes():
    out = build_eval_transform(image_size=50)(
        np.zeros((50, 50, 3), np.uint8),
        np.array([[-5, -5, 10, 10], [40, 40, 70, 45], [20, 20, 20.5, 30]], np.float32),
        np.array([4, 5, 6]),
    )
    np.testing.assert_allclose(out["boxes"], [[0, 0, 10, 10], [40, 40, 50, 45]])
    assert out["labels"].tolist() == [4, 5]


COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


@pytest.mark.parametrize("image_size", [96, (64, 128)])
def test_train_invariants_and_label_alignment(image_size):
    """Each box is painted in its label's colour, so the colour at the centre of every output box tells
    whether labels stayed with their boxes through scale jitter, crop (square or rectangular) and flip."""
    rng = np.random.default_rng(0)
    t = build_train_transform(image_size=image_size, seed=0)
    out_h, out_w = (image_size, image_size) if isinstance(image_size, int) else image_size
    checked = 0
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(60, 300, size=2))
        img = np.zeros((h, w, 3), np.uint8)
        labels = rng.permutation(4)
        # Four non-overlapping boxes, one per quadrant, in a random label order.
        boxes = []
        for q, k in enumerate(labels):
            qx, qy = (q % 2) * w / 2, (q // 2) * h / 2
            x0, y0 = qx + rng.uniform(0, w / 4), qy + rng.uniform(0, h / 4)
            x1, y1 = x0 + rng.uniform(8, w / 4), y0 + rng.uniform(8, h / 4)
            boxes.append([x0, y0, x1, y1])
            img[int(np.ceil(y0)):int(y1), int(np.ceil(x0)):int(x1)] = COLOURS[k]
        out = t(img, np.array(boxes, np.float32), labels)
        assert out["image"].shape == (out_h, out_w, 3) and out["image"].dtype == np.uint8
        assert out["labels"].dtype == np.int64 and out["boxes"].dtype == np.float32
        b = out["boxes"]
        assert len(b) == len(out["labels"]) <= 4
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= out_w).all() and (b[:, 3] <= out_h).all()
        assert ((b[:, 2] - b[:, 0]) >= 1).all() and ((b[:, 3] - b[:, 1]) >= 1).all()
        base = min(out_h / h, out_w / w)
        assert 0.1 * base <= out["scale"] <= 2.0 * base
        for box, label in zip(b, out["labels"]):
            if min(box[2] - box[0], box[3] - box[1]) < 6:
                continue  # too thin to sample a pixel safely away from interpolated edges
            cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            pixel = out["image"][cy, cx].astype(int)
            nearest = int(np.argmin(np.abs(COLOURS.astype(int) - pixel).sum(1)))
            assert nearest == label
            checked += 1
    assert checked > 40


def test_train_flip_mirrors_boxes():
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:20, 5:15] = 255
    t = build_train_transform(image_size=64, scale_range=(1.0, 1.0), hflip_prob=1.0)
    out = t(img, np.array([[5, 10, 15, 20]], np.float32), np.array([1]))
    np.testing.assert_allclose(out["boxes"], [[49, 10, 59, 20]], atol=1e-4)
    assert (out["image"][10:20, 49:59] == 255).all() and out["image"][:, :40].max() == 0
    assert out["scale"] == 1.0 and out["labels"].tolist() == [1]


def test_train_small_image_stays_top_left_and_scale_is_reported():
    # 20 x 40 image, image_size 64, fixed x0.5 jitter: 64 / 40 * 0.5 = 0.8 -> 16 x 32, at the top left.
    img = np.full((20, 40, 3), 9, np.uint8)
    t = build_train_transform(image_size=64, scale_range=(0.5, 0.5), hflip_prob=0.0)
    out = t(img, np.array([[10, 5, 20, 15]], np.float32), np.array([2]))
    assert out["scale"] == pytest.approx(0.8)
    assert (out["image"][:16, :32] == 9).all() and out["image"][16:].max() == 0 and out["image"][:, 32:].max() == 0
    np.testing.assert_allclose(out["boxes"], [[8, 4, 16, 12]], atol=1e-4)


def test_train_fixed_seed_repeats_and_empty_targets():
    img = np.random.default_rng(1).integers(0, 255, (120, 80, 3), dtype=np.uint8)
    boxes, labels = np.array([[10, 10, 60, 90]], np.float32), np.array([0])
    a = [build_train_transform(image_size=64, seed=5)(img, boxes, labels) for _ in range(2)]
    assert np.array_equal(a[0]["image"], a[1]["image"]) and a[0]["scale"] == a[1]["scale"]
    t = build_train_transform(image_size=64, seed=5)
    scales = {t(img, boxes, labels)["scale"] for _ in range(5)}
    assert len(scales) == 5  # consecutive calls draw new parameters
    empty = t(img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["labels"].dtype == np.int64


class _Scales(Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.img = np.zeros((50, 50, 3), np.uint8)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform(self.img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))["scale"]


def test_loader_workers_draw_different_augmentations_reproducibly():
    def run(seed):
        torch.manual_seed(seed)
        loader = DataLoader(_Scales(build_train_transform(image_size=50)), batch_size=1, num_workers=2)
        return [float(s) for s in loader]

    first = run(0)
    # Worker 0 serves items 0, 2, 4, ...; worker 1 items 1, 3, 5, ...: their draws must differ.
    assert first[0::2] != first[1::2]
    assert run(0) == first
    assert run(1) != first


def test_invalid_arguments():
    with pytest.raises(ValueError, match="scale_range"):
        build_train_transform(image_size=64, scale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="hflip_prob"):
        build_train_transform(image_size=64, hflip_prob=1.5)
    with pytest.raises(ValueError, match="image_size"):
        DetectionTransform(image_size=0, train=False)
    t = build_eval_transform(image_size=32)
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        t(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 4), np.float32), np.zeros(1))
