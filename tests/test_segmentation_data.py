"""Segmentation data: train/eval pipelines, collate, the generic image/mask folder and the synthetic
Cityscapes generator with its cache."""

from __future__ import annotations

import functools
import json
import random

import cv2
import numpy as np
import pytest
import torch

from datasets import (
    LABEL_ID_TO_TRAIN_ID,
    CityscapesSegmentation,
    DatasetError,
    DatasetNotFoundError,
    SegmentationFolder,
    build_segmentation_eval_transform,
    build_segmentation_train_transform,
    collate_segmentation,
    default_palette,
    synthetic_cityscapes_root,
    synthetic_coco_root,
    write_synthetic_cityscapes,
)

# Label k is painted with COLOURS[k]: an image whose colour encodes its label.
COLOURS = np.array(default_palette(10), dtype=np.uint8)


def _striped(h: int, w: int, stripes: int = 10):
    """Vertical stripes labelled 0..stripes-1 left to right, and the image painted with their colours."""
    mask = np.repeat((np.arange(w) * stripes // w)[None, :], h, axis=0).astype(np.uint8)
    return COLOURS[mask], mask


# ---------------------------------------------------------------------- train transform
def test_train_output_shapes_and_types():
    t = build_segmentation_train_transform(crop_size=(64, 96), seed=0)
    rng = np.random.default_rng(0)
    for h, w in ((60, 90), (200, 300), (64, 96), (20, 500)):
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 19, (h, w), dtype=np.uint8)
        out = t(image, mask)
        assert out["image"].shape == (64, 96, 3) and out["image"].dtype == np.uint8
        assert out["mask"].shape == (64, 96) and out["mask"].dtype == np.uint8
        assert set(np.unique(out["mask"])) <= set(range(19)) | {255}


def test_padding_is_ignored_in_the_mask_and_black_in_the_image():
    t = build_segmentation_train_transform(
        crop_size=(64, 96), scale_range=(1, 1), hflip_prob=0, color_jitter=0
    )
    image = np.full((40, 50, 3), 200, np.uint8)
    mask = np.full((40, 50), 3, np.uint8)
    out = t(image, mask)
    assert (out["mask"][:40, :50] == 3).all() and (out["image"][:40, :50] == 200).all()
    assert (out["mask"][40:] == 255).all() and (out["mask"][:, 50:] == 255).all()
    assert (out["image"][40:] == 0).all() and (out["image"][:, 50:] == 0).all()


def test_base_size_then_scale():
    t = build_segmentation_train_transform(
        crop_size=(50, 100), base_size=(50, 100), scale_range=(1, 1), hflip_prob=0, color_jitter=0
    )
    image, mask = _striped(100, 200)
    out = t(image, mask)
    np.testing.assert_array_equal(out["mask"], cv2.resize(mask, (100, 50), interpolation=cv2.INTER_NEAREST))
    np.testing.assert_array_equal(out["image"], cv2.resize(image, (100, 50), interpolation=cv2.INTER_LINEAR))
    # Scale 2 on top of base_size: a 100x200 image, cropped to 50x100 somewhere inside it.
    t2 = build_segmentation_train_transform(
        crop_size=(50, 100), base_size=(50, 100), scale_range=(2, 2), hflip_prob=0, color_jitter=0, seed=1
    )
    crops = [t2(image[:50, :100].copy(), mask[:50, :100].copy())["mask"] for _ in range(5)]
    assert all(c.shape == (50, 100) and (c != 255).all() for c in crops)


def test_fixed_seed_repeats_and_global_random_seeds_unseeded_transforms():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (70, 110, 3), dtype=np.uint8)
    mask = rng.integers(0, 19, (70, 110), dtype=np.uint8)

    def draws(t):
        return [t(image, mask) for _ in range(4)]

    a = draws(build_segmentation_train_transform(crop_size=(48, 64), seed=5))
    b = draws(build_segmentation_train_transform(crop_size=(48, 64), seed=5))
    c = draws(build_segmentation_train_transform(crop_size=(48, 64), seed=6))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))
    assert len({x["mask"].tobytes() for x in a}) > 1, "successive draws differ"
    random.seed(11)
    d = draws(build_segmentation_train_transform(crop_size=(48, 64)))
    random.seed(11)
    e = draws(build_segmentation_train_transform(crop_size=(48, 64)))
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(d, e))


def test_flip_and_crop_keep_image_and_mask_aligned():
    t = build_segmentation_train_transform(crop_size=(32, 48), scale_range=(1, 1), color_jitter=0, seed=0)
    image, mask = _striped(40, 80)
    flipped = kept = 0
    for _ in range(30):
        out = t(image, mask)
        m, im = out["mask"], out["image"]
        assert (m != 255).all()
        np.testing.assert_array_equal(im, COLOURS[m])  # the colour still encodes the label at every pixel
        if m[0, 0] < m[0, -1]:
            kept += 1
        elif m[0, 0] > m[0, -1]:
            flipped += 1
    assert flipped >= 5 and kept >= 5


def test_scaled_crop_equals_resizing_the_whole_image_then_cropping():
    """Resize, pad and crop computed on the crop's window only: the mask exactly as cv2.resize (nearest) and crop,
    the image within one level of cv2.resize (bilinear), for up- and downscales, exact and odd factors, windows at
    the edges and crops larger than the scaled image (padded)."""
    from datasets.segmentation_transforms import _scaled_crop

    rng = np.random.default_rng(0)
    cases = [((64, 128), (128, 256), (40, 64)), ((64, 128), (32, 64), (40, 64)), ((50, 70), (50, 70), (20, 30))]
    for _ in range(200):
        cases.append((tuple(int(v) for v in rng.integers(5, 100, 2)), tuple(int(v) for v in rng.integers(1, 250, 2)),
                      tuple(int(v) for v in rng.integers(1, 90, 2))))
    for (h, w), (nh, nw), (ch, cw) in cases:
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (3, 3), 0)
        mask = rng.integers(0, 19, (h, w), dtype=np.uint8)
        scaled = ((image, mask) if (nh, nw) == (h, w) else
                  (cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR),
                   cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)))
        padded_image = np.zeros((max(nh, ch), max(nw, cw), 3), np.uint8)
        padded_mask = np.full(padded_image.shape[:2], 255, np.uint8)
        padded_image[:nh, :nw], padded_mask[:nh, :nw] = scaled
        for y0, x0 in {(0, 0), (max(nh - ch, 0), max(nw - cw, 0)),
                       (int(rng.integers(0, max(nh - ch, 0) + 1)), int(rng.integers(0, max(nw - cw, 0) + 1)))}:
            got_image, got_mask = _scaled_crop(image, mask, (nh, nw), (y0, x0), (ch, cw))
            want_image, want_mask = padded_image[y0:y0 + ch, x0:x0 + cw], padded_mask[y0:y0 + ch, x0:x0 + cw]
            np.testing.assert_array_equal(got_mask, want_mask)
            assert got_image.shape == want_image.shape and got_image.dtype == np.uint8
            assert np.abs(got_image.astype(int) - want_image.astype(int)).max() <= 1, ((h, w), (nh, nw), (y0, x0))


def test_colour_jitter_changes_the_image_only():
    image, mask = _striped(64, 96)
    plain = build_segmentation_train_transform(crop_size=(48, 64), color_jitter=0, seed=3)(image, mask)
    jittered = build_segmentation_train_transform(crop_size=(48, 64), color_jitter=0.4, seed=3)(image, mask)
    np.testing.assert_array_equal(plain["mask"], jittered["mask"])
    assert not np.array_equal(plain["image"], jittered["image"])


def test_invalid_transform_arguments():
    with pytest.raises(ValueError, match="crop_size"):
        build_segmentation_train_transform(crop_size=(0, 10))
    with pytest.raises(ValueError, match="scale_range"):
        build_segmentation_train_transform(crop_size=(8, 8), scale_range=(2, 1))
    t = build_segmentation_train_transform(crop_size=(8, 8))
    with pytest.raises(ValueError, match="mask"):
        t(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 9), np.uint8))


# ---------------------------------------------------------------------- eval transform
def test_eval_transform_resizes_the_image_only():
    image, mask = _striped(64, 128)
    out = build_segmentation_eval_transform(eval_size=(32, 48))(image, mask)
    assert out["image"].shape == (32, 48, 3)
    np.testing.assert_array_equal(out["mask"], mask)
    same = build_segmentation_eval_transform()(image, mask)
    np.testing.assert_array_equal(same["image"], image)
    np.testing.assert_array_equal(same["mask"], mask)


# ---------------------------------------------------------------------- collate
def _sample(index, image_hw, mask_hw, orig):
    return {
        "image": torch.full((3, *image_hw), index + 1, dtype=torch.uint8),
        "mask": torch.full(mask_hw, index, dtype=torch.uint8),
        "index": index,
        "orig_size": orig,
        "valid_size": image_hw,
    }


def test_collate_pads_images_to_the_divisor_and_masks_with_ignore():
    samples = [_sample(0, (50, 70), (100, 140), (100, 140)), _sample(1, (64, 100), (80, 150), (80, 150))]
    collate = functools.partial(collate_segmentation, size_divisor=32)
    batch = collate(samples)
    assert batch["images"].shape == (2, 3, 64, 128) and batch["images"].dtype == torch.uint8
    assert (batch["images"][0, :, :50, :70] == 1).all() and batch["images"][0, :, 50:].sum() == 0
    assert batch["images"][0, :, :, 70:].sum() == 0 and (batch["images"][1, :, :64, :100] == 2).all()
    assert batch["images"][1, :, :, 100:].sum() == 0
    assert batch["masks"].shape == (2, 100, 150) and batch["masks"].dtype == torch.uint8
    assert (batch["masks"][0, :, :140] == 0).all() and (batch["masks"][0, :, 140:] == 255).all()
    assert (batch["masks"][1, :80, :150] == 1).all() and (batch["masks"][1, 80:] == 255).all()
    assert (
        batch["valid_sizes"].tolist() == [[50, 70], [64, 100]] and batch["valid_sizes"].dtype == torch.int64
    )
    assert (
        batch["orig_sizes"].tolist() == [[100, 140], [80, 150]] and batch["orig_sizes"].dtype == torch.int64
    )
    assert batch["indices"].tolist() == [0, 1] and batch["indices"].dtype == torch.int64
    assert collate_segmentation(samples[:1])["images"].shape == (1, 3, 128, 128)  # default divisor 128
    assert collate_segmentation(samples[:1], size_divisor=1)["images"].shape == (1, 3, 50, 70)
    with pytest.raises(ValueError):
        collate_segmentation([])


# ---------------------------------------------------------------------- SegmentationFolder
@pytest.fixture
def folder(tmp_path):
    image_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    image_dir.mkdir()
    mask_dir.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg", "c.BMP"):
        cv2.imwrite(str(image_dir / name), rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
        mask = rng.integers(0, 3, (24, 32)).astype(np.uint8)
        mask[:4, :4] = 7  # the dataset's own ignore value
        cv2.imwrite(str(mask_dir / f"{name.rsplit('.', 1)[0]}_mask.png"), mask)
    (image_dir / "notes.txt").write_text("not an image")
    return image_dir, mask_dir


def test_folder_pairs_and_remaps_the_ignore_value(folder):
    image_dir, mask_dir = folder
    ds = SegmentationFolder(
        image_dir=image_dir,
        mask_dir=mask_dir,
        class_names=["x", "y", "z"],
        ignore_index=7,
        mask_suffix="_mask.png",
    )
    assert len(ds) == 3 and [ds.output_name(i) for i in range(3)] == ["a", "b", "c"]
    assert ds.prediction_file_name(2) == "c.png"
    assert ds.num_classes == 3 and ds.ignore_index == 255 and ds.mask_ignore_index == 7
    assert (
        ds.class_names == ("x", "y", "z") and len(set(ds.palette)) == 3 and ds.palette == default_palette(3)
    )
    for i in range(3):
        raw = cv2.imread(str(ds.mask_path(i)), cv2.IMREAD_UNCHANGED)
        sample = ds[i]
        expected = np.where(raw == 7, 255, raw)
        np.testing.assert_array_equal(sample["mask"].numpy(), expected)
        assert sample["image"].shape == (3, 24, 32) and sample["orig_size"] == (24, 32)
        out = ds.label_ids_for_output(sample["mask"].numpy())
        assert out.dtype == np.uint8 and (out == expected).all()
    train = SegmentationFolder(
        image_dir=image_dir,
        mask_dir=mask_dir,
        class_names=["x", "y", "z"],
        ignore_index=7,
        mask_suffix="_mask.png",
        transform=build_segmentation_train_transform(crop_size=(32, 32), seed=0),
    )
    sample = train[0]
    assert sample["mask"].shape == (32, 32) and sample["valid_size"] == (32, 32)
    assert set(np.unique(sample["mask"].numpy())) <= {0, 1, 2, 255}


def test_folder_errors(folder, tmp_path):
    image_dir, mask_dir = folder
    kwargs = {
        "image_dir": image_dir,
        "mask_dir": mask_dir,
        "class_names": ["x", "y", "z"],
        "mask_suffix": "_mask.png",
    }
    ds = SegmentationFolder(**kwargs, ignore_index=7)
    bad = cv2.imread(str(ds.mask_path(1)), cv2.IMREAD_UNCHANGED)
    bad[10, 10] = 5
    cv2.imwrite(str(ds.mask_path(1)), bad)
    with pytest.raises(DatasetError) as err:
        ds[1]
    assert str(ds.mask_path(1)) in str(err.value) and "[5]" in str(err.value)
    with pytest.raises(DatasetError, match=r"\[5, 7\]"):  # 7 is no longer the ignore value
        SegmentationFolder(**kwargs)[1]
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationFolder(**kwargs, ignore_index=2)
    with pytest.raises(ValueError, match="255"):
        SegmentationFolder(**{**kwargs, "class_names": [str(i) for i in range(256)]})
    (mask_dir / "c_mask.png").unlink()
    with pytest.raises(DatasetError) as err:
        SegmentationFolder(**kwargs, ignore_index=7)
    assert str(image_dir / "c.BMP") in str(err.value) and str(mask_dir / "c_mask.png") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        SegmentationFolder(**{**kwargs, "image_dir": tmp_path / "empty"})
    with pytest.raises(DatasetNotFoundError, match="missing"):
        SegmentationFolder(**{**kwargs, "image_dir": tmp_path / "missing"})


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_low_bit_depth_masks_read_as_stored(tmp_path, bits):
    """1-, 2- and 4-bit grey PNG masks (OpenCV stretches their values to 0..255: a 1-bit mask's class 1 read as 255,
    the ignore value) give the class values they store; a palette PNG is named as such."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.zeros((24, 32), np.uint8)
    mask[5:15, 8:20] = 1
    if bits > 1:
        mask[16:, :10] = 2**bits - 1
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((24, 32, 3), np.uint8))
    picture = Image.fromarray(mask.astype(bool)) if bits == 1 else Image.fromarray(mask)
    picture.save(tmp_path / "masks" / "a.png", bits=bits)
    with open(tmp_path / "masks" / "a.png", "rb") as f:
        assert f.read(26)[24] == bits  # the file is really of that depth
    names = [str(k) for k in range(2**bits)]
    ds = SegmentationFolder(image_dir=tmp_path / "images", mask_dir=tmp_path / "masks", class_names=names)
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), mask)
    Image.fromarray(mask).convert("P").save(tmp_path / "masks" / "a.png")
    with pytest.raises(DatasetError, match="a palette PNG"):
        ds[0]


# ---------------------------------------------------------------------- synthetic Cityscapes
def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_synthetic_cityscapes_is_deterministic_and_rich(tmp_path):
    params = {"num_train": 6, "num_val": 2, "height": 64, "width": 128}
    a = write_synthetic_cityscapes(tmp_path / "a", seed=4, **params)
    b = write_synthetic_cityscapes(tmp_path / "b", seed=4, **params)
    c = write_synthetic_cityscapes(tmp_path / "c", seed=5, **params)
    files_a = _files(a)
    assert files_a == _files(b)
    assert files_a.keys() == _files(c).keys() and files_a != _files(c)
    assert len(files_a) == 2 * (6 + 2)
    assert "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png" in files_a
    assert "gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelIds.png" in files_a
    train = CityscapesSegmentation(root=a, split="train")
    ids = np.zeros(256, dtype=np.int64)
    for i in range(len(train)):
        raw = cv2.imread(str(train.mask_path(i)), cv2.IMREAD_UNCHANGED)
        assert raw.shape == (64, 128) and raw.dtype == np.uint8
        assert (raw[-1] == 1).all(), "the ego vehicle strip runs along the bottom"
        assert (raw[0] == 23).mean() > 0.5, "sky at the top"
        ids += np.bincount(raw.ravel(), minlength=256)
    present = set(np.flatnonzero(ids).tolist())
    assert {0, 1, 23, 11, 21, 7, 8, 26, 24, 17} <= present
    assert {4, 5} & present
    assert len({int(LABEL_ID_TO_TRAIN_ID[i]) for i in present} - {255}) >= 8


def test_synthetic_colours_encode_the_labels(tmp_path):
    from datasets.synthetic_cityscapes import SYNTHETIC_CITYSCAPES_COLOURS

    root = write_synthetic_cityscapes(tmp_path / "d", num_train=2, num_val=0, height=64, width=128, seed=0)
    ds = CityscapesSegmentation(root=root, split="train")
    ids = np.array(sorted(SYNTHETIC_CITYSCAPES_COLOURS))
    colours = np.array([SYNTHETIC_CITYSCAPES_COLOURS[i] for i in ids], dtype=np.float64)
    for i in range(len(ds)):
        rgb = cv2.imread(str(ds.image_path(i)))[..., ::-1].reshape(-1, 3).astype(np.float64)
        raw = cv2.imread(str(ds.mask_path(i)), cv2.IMREAD_UNCHANGED).reshape(-1)
        nearest = ids[np.argmin(((rgb[:, None] - colours[None]) ** 2).sum(-1), axis=1)]
        assert (nearest == raw).mean() > 0.97


def test_cache_reuses_a_complete_folder(tmp_path):
    params = {"num_train": 2, "num_val": 1, "height": 32, "width": 64}
    a = synthetic_cityscapes_root(tmp_path, **params)
    assert a.parent == tmp_path and a.name.startswith("cityscapes-")
    marker = a / "synthetic.json"
    assert json.loads(marker.read_text())["num_train"] == 2
    stamps = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    assert synthetic_cityscapes_root(tmp_path, **params) == a
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == stamps, "nothing is rewritten"
    b = synthetic_cityscapes_root(tmp_path, **params, seed=1)
    assert b != a and b.parent == tmp_path
    coco = synthetic_coco_root(tmp_path, num_train=1, num_val=1)
    assert coco.name.startswith("coco-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (a, b, coco)), (
        "no temp folders"
    )
    with pytest.raises(TypeError, match="colour"):
        synthetic_cityscapes_root(tmp_path, colour="red")
    with pytest.raises(ValueError, match="train_cities"):
        synthetic_cityscapes_root(tmp_path, train_cities=("bad_name",))
    # A folder without the marker was not completed by the generator: it is neither trusted nor overwritten.
    marker.unlink()
    with pytest.raises(DatasetError, match="not a synthetic dataset"):
        synthetic_cityscapes_root(tmp_path, **params)


# ---------------------------------------------------------------------- decoded cache
def _samples(ds, keys):
    return [(ds[k]["image"].numpy(), ds[k]["mask"].numpy()) for k in keys]


def test_decoded_cache_gives_the_same_samples_and_notices_changed_files(tmp_path, caplog):
    root = write_synthetic_cityscapes(tmp_path / "cs", num_train=3, num_val=1, height=64, width=128, seed=2)
    cache = tmp_path / "decoded"

    def make(**kw):
        return CityscapesSegmentation(root=root, split="train", **kw,
                                      transform=build_segmentation_train_transform(crop_size=(48, 64), seed=0))

    keys = [3, 4, 5, 7]  # sample keys (epoch 0 and 1): the same augmentation in every dataset below
    plain = _samples(make(), keys)
    first = _samples(make(decoded_cache=cache), keys)  # decodes and writes the entries
    assert len(list(cache.rglob("*.npy"))) == 6 and not list(cache.rglob("*.tmp"))
    cached = make(decoded_cache=cache)
    image, mask = cached.read_pair(0)
    assert isinstance(image, np.memmap) and isinstance(mask, np.memmap)  # read from the cache
    for a, b, c in zip(plain, first, _samples(cached, keys)):
        for x, y, z in zip(a, b, c):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)
    # Eval samples (the whole image, the mask at full resolution) read through the cache are the decoded ones.
    val = CityscapesSegmentation(root=root, split="val", transform=build_segmentation_eval_transform())
    val_cached = CityscapesSegmentation(root=root, split="val", transform=build_segmentation_eval_transform(),
                                        decoded_cache=cache)
    for _ in range(2):
        for x, y in zip(_samples(val, [0]), _samples(val_cached, [0])):
            for u, v in zip(x, y):
                np.testing.assert_array_equal(u, v)
    whole = val_cached[0]  # a copy, not the read-only mapping of the cache's files
    whole["image"] += 1
    whole["mask"] += 1

    # A changed mask file is decoded again (its size and modification time are in the key).
    path = cached.mask_path(0)
    stored = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), np.full_like(stored, 26))  # label id 26 = train id 13 (car)
    _, mask = make(decoded_cache=cache).read_pair(0)
    assert not isinstance(mask, np.memmap) and (mask == 13).all()
    assert (make(decoded_cache=cache).read_pair(0)[1] == 13).all()

    # A cut-short entry is decoded again, with a warning, and written anew.
    entry = cached._cache_files(1)[0]
    size = entry.stat().st_size
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        again = _samples(make(decoded_cache=cache), [4])  # image 1
    assert "unreadable decoded copy" in caplog.text
    for x, y in zip(plain[1], again[0]):
        np.testing.assert_array_equal(x, y)
    assert entry.stat().st_size == size
    # An empty entry (what a crash between write and rename could leave without the flush) and an image entry
    # without its mask are decoded again and rewritten.
    entry.write_bytes(b"")
    cached._cache_files(2)[1].unlink()
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = _samples(make(decoded_cache=cache), [4, 5])  # images 1 and 2
    assert caplog.text.count("unreadable decoded copy") == 1 and "EOFError" in caplog.text
    for want, got in zip(plain[1:3], again):
        for x, y in zip(want, got):
            np.testing.assert_array_equal(x, y)
    assert entry.stat().st_size == size and cached._cache_files(2)[1].is_file()
    assert all(isinstance(a, np.memmap) for i in range(3) for a in make(decoded_cache=cache).read_pair(i))
    # Samples own their memory (the cache's files are mapped read-only).
    sample = make(decoded_cache=cache)[4]
    sample["mask"] += 1
    sample["image"] += 1


def test_decoded_cache_keeps_bad_input_errors_and_survives_an_unwritable_folder(tmp_path, caplog):
    root = write_synthetic_cityscapes(tmp_path / "cs", num_train=2, num_val=1, height=32, width=64, seed=1)
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    ds = CityscapesSegmentation(root=root, split="train", decoded_cache=blocked)
    with caplog.at_level("WARNING"):
        image, mask = ds.read_pair(0)
        ds.read_pair(1)
    assert image.shape == (32, 64, 3) and mask.shape == (32, 64)
    assert caplog.text.count("cannot write decoded copies") == 1 and str(blocked) in caplog.text
    assert "unreadable" not in caplog.text and "cannot read" not in caplog.text  # a missing folder: no entries
    assert CityscapesSegmentation(root=root, split="train", decoded_cache="").decoded_cache is None
    # A bad mask still names its file with the cache on, and nothing is cached for it.
    path = ds.mask_path(1)
    bad = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    bad[0, 0] = 200
    cv2.imwrite(str(path), bad)
    cache = tmp_path / "decoded"
    with pytest.raises(DatasetError) as err:
        CityscapesSegmentation(root=root, split="train", decoded_cache=cache)[1]
    assert str(path) in str(err.value) and "[200]" in str(err.value)
    assert not list(cache.rglob("*.npy"))


def test_decoded_cache_removes_temporaries_of_killed_writers_only_when_old(tmp_path):
    import os
    import time

    root = write_synthetic_cityscapes(tmp_path / "cs", num_train=1, num_val=1, height=32, width=64, seed=1)
    cache = tmp_path / "decoded"
    (cache / "ab").mkdir(parents=True)
    old, recent = cache / "ab" / ".x.image.npy.1.tmp", cache / "ab" / ".y.image.npy.2.tmp"
    old.write_bytes(b"partial")
    recent.write_bytes(b"being written by another process")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    CityscapesSegmentation(root=root, split="train", decoded_cache=cache)
    assert not old.exists() and recent.exists()
