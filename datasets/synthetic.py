"""Built-in synthetic data: a real COCO-format folder of coloured shapes, written once into a cache.

Tests and the quick start read it with the same loader as real COCO. It keeps COCO's quirks: category
ids with gaps, image ids that are not 0..N-1, crowd regions with RLE masks (``iscrowd: 1``), images with
no objects, objects cut by the image border (boxes clipped to the image) and partly overlapping objects.

Layout (COCO 2017)::

    root/annotations/instances_train2017.json
    root/annotations/instances_val2017.json
    root/train2017/000000001000.jpg ...
    root/val2017/000000900000.jpg ...
    root/synthetic.json            # written last: the generator parameters, marks the copy complete
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ._cache import cached_root, write_atomically

__all__ = ["SPLITS", "SYNTHETIC_CATEGORIES", "synthetic_coco_root", "write_synthetic_coco"]

#: (category id, name, base RGB colour). The ids have gaps on purpose; each class has its own colour family.
SYNTHETIC_CATEGORIES: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (1, "circle", (220, 40, 40)),
    (3, "square", (40, 200, 60)),
    (7, "triangle", (40, 80, 230)),
    (12, "cross", (235, 200, 30)),
)
#: (split folder, first image id). Ids step by 3, so they are neither 0..N-1 nor contiguous.
SPLITS: tuple[tuple[str, int], ...] = (("train2017", 1000), ("val2017", 900_000))
_ID_STEP = 3
_VERSION = 2  # bump when the generated content changes, so cached copies are regenerated

_MAX_OBJECTS = 4
_EMPTY_EVERY = 10  # image i has no objects when i % 10 == 7: ~10% of the images, always some in 8+ images
_CROWD_EVERY = 8  # image i gets a crowd region when i % 8 == 5 (and it is not an empty image)
_MAX_OVERLAP = 0.3  # a new object may cover at most this fraction of an earlier one (and vice versa)


def _unit_polygon(kind: str) -> np.ndarray:
    """Polygon ``[K, 2]`` of a shape of class ``kind`` inscribed in the box [-0.5, 0.5]^2."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1) * 0.5
    if kind == "square":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if kind == "triangle":
        return np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if kind == "cross":
        a = 1 / 6
        return np.array(
            [[-a, -0.5], [a, -0.5], [a, -a], [0.5, -a], [0.5, a], [a, a], [a, 0.5], [-a, 0.5], [-a, a],
             [-0.5, a], [-0.5, -a], [-a, -a]]
        )
    raise ValueError(f"unknown shape {kind!r}")


def _clip_polygon(poly: np.ndarray, w: int, h: int) -> np.ndarray:
    """Clip a polygon ``[K, 2]`` to the rectangle [0, w] x [0, h] (Sutherland-Hodgman; the clip region is
    convex, so this is exact for any simple polygon, convex or not)."""
    pts = [tuple(p) for p in poly]
    for axis, limit, keep_below in ((0, 0.0, False), (0, float(w), True), (1, 0.0, False), (1, float(h), True)):
        if not pts:
            break

        def inside(p, axis=axis, limit=limit, keep_below=keep_below):
            return p[axis] <= limit if keep_below else p[axis] >= limit

        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur) != inside(prev):
                t = (limit - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if inside(cur):
                out.append(cur)
        pts = out
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A greyish, mildly textured background: tint + smooth low-frequency variation + pixel noise."""
    base = rng.uniform(70, 170) + rng.uniform(-20, 20, size=3)
    coarse = rng.normal(0, 18, size=(5, 5, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img = base.astype(np.float32) + smooth + rng.normal(0, 8, size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _rasterize(polygon: np.ndarray, h: int, w: int) -> np.ndarray:
    """``h x w`` uint8 mask of a polygon in COCO pixel coordinates, rasterised as COCO's own tools do, so
    the painted pixels, the segmentation, the area and the box agree exactly."""
    rle = mask_utils.frPyObjects([polygon.reshape(-1).tolist()], h, w)
    with warnings.catch_warnings():  # pycocotools' decode trips a harmless numpy 2 copy= deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)[..., 0]


def _place_object(rng, h: int, w: int, kind: str, masks: list[np.ndarray]):
    """Sample a shape (polygon clipped to the image, mask) that does not hide much of an earlier one and is
    not hidden by it; ``None`` if no placement fits."""
    for _ in range(10):
        side = min(h, w) * rng.uniform(0.15, 0.6)
        aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.6)))
        bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
        # Centres reach close to the border, so some objects are cut by it.
        cx, cy = rng.uniform(0.05 * w, 0.95 * w), rng.uniform(0.05 * h, 0.95 * h)
        poly = _clip_polygon(_unit_polygon(kind) * np.array([bw, bh]) + np.array([cx, cy]), w, h)
        poly = np.round(poly, 2)
        if len(poly) < 3:
            continue
        mask = _rasterize(poly, h, w)
        area = int(mask.sum())
        if area < 64:
            continue
        if all(int(np.logical_and(mask, other).sum()) <= _MAX_OVERLAP * min(area, int(other.sum())) for other in masks):
            return poly, mask
    return None


def _draw_image(rng: np.random.Generator, index: int, h: int, w: int):
    """One image and its annotations (without ids): ``(rgb image, [annotation dicts])``."""
    img = _background(rng, h, w)
    objects: list[tuple[int, np.ndarray, np.ndarray]] = []  # (category id, clipped polygon, mask)
    num_obj = 0 if index % _EMPTY_EVERY == _EMPTY_EVERY - 3 else int(rng.integers(1, _MAX_OBJECTS + 1))
    for _ in range(num_obj):
        cid, kind, colour = SYNTHETIC_CATEGORIES[int(rng.integers(len(SYNTHETIC_CATEGORIES)))]
        placed = _place_object(rng, h, w, kind, [m for _, _, m in objects])
        if placed is None:
            continue
        poly, mask = placed
        col = np.clip(np.asarray(colour, np.float64) + rng.normal(0, 18, 3), 0, 255).astype(np.uint8)
        img[mask.astype(bool)] = col
        objects.append((cid, poly, mask))

    anns = []
    for cid, poly, mask in objects:
        # Box and area of the whole shape (later shapes hide at most _MAX_OVERLAP of it).
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        anns.append(
            {
                "category_id": cid, "iscrowd": 0, "area": float(mask.sum()),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "segmentation": [poly.reshape(-1).tolist()],
            }
        )

    if num_obj and index % _CROWD_EVERY == _CROWD_EVERY - 3:
        # A crowd: a cluster of small discs of one class, annotated once with an RLE mask of what is visible.
        cid, _, colour = SYNTHETIC_CATEGORIES[int(rng.integers(len(SYNTHETIC_CATEGORIES)))]
        crowd = np.zeros((h, w), np.uint8)
        ccx, ccy = rng.uniform(0.25 * w, 0.75 * w), rng.uniform(0.25 * h, 0.75 * h)
        radius = max(2, round(0.025 * min(h, w)))
        for _ in range(int(rng.integers(8, 14))):
            px, py = ccx + rng.normal(0, 0.08 * w), ccy + rng.normal(0, 0.08 * h)
            cv2.circle(crowd, (round(float(px)), round(float(py))), radius, 1, -1)
        for _, _, m in objects:
            crowd[m.astype(bool)] = 0
        if crowd.sum() >= 16:
            img[crowd.astype(bool)] = np.asarray(colour, np.uint8)
            rle = mask_utils.encode(np.asfortranarray(crowd))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            area = float(mask_utils.area(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append({"category_id": cid, "iscrowd": 1, "area": area, "bbox": bbox, "segmentation": rle})
    return img, anns


def _write_split(rng, out_dir: Path, first_id: int, n: int, sizes: tuple[int, int], ann_id: int):
    images, annotations = [], []
    for i in range(n):
        image_id = first_id + _ID_STEP * i
        h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        img, anns = _draw_image(rng, i, h, w)
        name = f"{image_id:012d}.jpg"
        ok = cv2.imwrite(str(out_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise OSError(f"could not write {out_dir / name}")
        images.append({"id": image_id, "file_name": name, "height": h, "width": w, "license": 1})
        for ann in anns:
            annotations.append({"id": ann_id, "image_id": image_id, **ann})
            ann_id += 1
    return images, annotations, ann_id


def _generate(tmp: Path, params: dict) -> None:
    (tmp / "annotations").mkdir()
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in SYNTHETIC_CATEGORIES]
    ann_id = 1
    for split_index, ((split, first_id), n) in enumerate(zip(SPLITS, (params["num_train"], params["num_val"]))):
        (tmp / split).mkdir()
        # One random stream per split: the val images do not change when num_train does.
        rng = np.random.default_rng([params["seed"], split_index])
        images, annotations, ann_id = _write_split(rng, tmp / split, first_id, n, tuple(params["image_size"]), ann_id)
        data = {
            "info": {
                "description": "effdense synthetic shapes (COCO instances format)",
                "version": str(_VERSION),
                "year": 2017,
                "contributor": "effdense",
            },
            "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def write_synthetic_coco(
    root: str | Path,
    *,
    num_train: int = 96,
    num_val: int = 24,
    image_size: tuple[int, int] = (160, 224),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic dataset to ``root`` in the COCO 2017 layout and return ``root``.

    Image heights and widths are drawn independently from ``image_size = (min, max)``. If ``root`` already
    holds a complete copy written with the same parameters, nothing is written. The data is generated in a
    temporary sibling folder and renamed into place, so an interrupted run never leaves a half-written
    dataset. An existing folder that this generator did not write is only replaced with ``overwrite=True``.
    """
    params = _params(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    return write_atomically(root, params, lambda tmp: _generate(tmp, params), overwrite=overwrite)


def _params(*, num_train: int, num_val: int, image_size: tuple[int, int], seed: int) -> dict:
    """The validated, canonical generator parameters (what the marker file holds)."""
    num_train, num_val, seed = int(num_train), int(num_val), int(seed)
    lo, hi = (int(v) for v in image_size)
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    if not 32 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) side lengths with 32 <= min <= max, got {image_size}")
    return {"num_train": num_train, "num_val": num_val, "image_size": [lo, hi], "seed": seed, "version": _VERSION}


def synthetic_coco_root(cache_dir: str | Path, **params) -> Path:
    """Generate (once) and return the synthetic dataset for ``params`` (the keyword arguments of
    :func:`write_synthetic_coco`) under ``cache_dir``. Each parameter set gets its own sub-folder, named by a
    short hash of the parameters, so different parameters never share (or overwrite) a copy."""
    return cached_root(cache_dir, prefix="coco", writer=write_synthetic_coco, normalize=_params, params=params)
