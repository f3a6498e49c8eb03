"""Built-in synthetic data: a real COCO-format folder of coloured shapes, written once into a cache.

Tests and the quick start read it with the same loader as real COCO. It keeps COCO's quirks: category
ids with gaps, image ids that are not 0..N-1, crowd regions with RLE masks (``iscrowd: 1``), images with
no objects, and objects cut by the image border.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["write_synthetic_coco", "synthetic_coco_root", "SYNTHETIC_CATEGORIES"]

#: (category id, name, base RGB colour). Ids have gaps on purpose.
SYNTHETIC_CATEGORIES = (
    (1, "circle", (220, 40, 40)),
    (3, "square", (40, 200, 60)),
    (7, "triangle", (40, 80, 230)),
    (12, "cross", (235, 200, 30)),
)
_MARKER = "synthetic.json"
_VERSION = 1


def _shape_polygon(kind: str, cx: float, cy: float, w: float, h: float) -> np.ndarray:
    """Polygon ``[K, 2]`` (x, y) of a shape of class ``kind`` filling a w x h box centred at (cx, cy)."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * 0.5
    elif kind == "square":
        pts = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif kind == "triangle":
        pts = np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    else:  # cross
        a = 1 / 6
        pts = np.array(
            [[-a, -0.5], [a, -0.5], [a, -a], [0.5, -a], [0.5, a], [a, a], [a, 0.5], [-a, 0.5], [-a, a],
             [-0.5, a], [-0.5, -a], [-a, -a]]
        )
    return pts * np.array([w, h]) + np.array([cx, cy])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(60, 160, size=3)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, size=(2, 3))
    img = base + gx[..., None] * slope[0] + gy[..., None] * slope[1]
    img = img + rng.normal(0, 12, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_split(rng: np.random.Generator, out_dir: Path, first_id: int, n: int, sizes: tuple[int, int], ann_start: int):
    images, annotations = [], []
    ann_id = ann_start
    kinds = [(cid, name, np.array(col, dtype=np.float64)) for cid, name, col in SYNTHETIC_CATEGORIES]
    for i in range(n):
        image_id = first_id + 3 * i
        h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        img = _background(rng, h, w)
        num_obj = 0 if rng.random() < 0.1 else int(rng.integers(1, 5))
        for _ in range(num_obj):
            cid, kind, colour = kinds[int(rng.integers(len(kinds)))]
            side = min(h, w) * rng.uniform(0.15, 0.6)
            aspect = rng.uniform(0.6, 1.6)
            bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
            # Centres may lie near the border so some objects are cut by it.
            cx, cy = rng.uniform(0.05 * w, 0.95 * w), rng.uniform(0.05 * h, 0.95 * h)
            poly = _shape_polygon(kind, cx, cy, bw, bh)
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
            if mask.sum() < 16:
                continue
            col = np.clip(colour + rng.normal(0, 15, 3), 0, 255)
            img[mask.astype(bool)] = col.astype(np.uint8)
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
            clipped = poly.copy()
            clipped[:, 0] = clipped[:, 0].clip(0, w)
            clipped[:, 1] = clipped[:, 1].clip(0, h)
            annotations.append(
                {
                    "id": ann_id, "image_id": image_id, "category_id": cid, "iscrowd": 0,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()),
                    "segmentation": [np.round(clipped.reshape(-1), 2).tolist()],
                }
            )
            ann_id += 1
        if num_obj and rng.random() < 0.12:
            # A crowd: a cluster of small circles, annotated once with an RLE mask of their union.
            crowd = np.zeros((h, w), np.uint8)
            ccx, ccy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
            for _ in range(int(rng.integers(6, 12))):
                px, py = ccx + rng.normal(0, 0.08 * w), ccy + rng.normal(0, 0.08 * h)
                cv2.circle(crowd, (int(px), int(py)), max(2, int(0.025 * min(h, w))), 1, -1)
            img[crowd.astype(bool)] = kinds[0][2].astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(crowd))
            x, y, bw_, bh_ = (float(v) for v in mask_utils.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": ann_id, "image_id": image_id, "category_id": kinds[0][0], "iscrowd": 1,
                    "bbox": [x, y, bw_, bh_], "area": float(crowd.sum()),
                    "segmentation": rle,
                }
            )
            ann_id += 1
        name = f"{image_id:012d}.jpg"
        cv2.imwrite(str(out_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    return images, annotations, ann_id


def write_synthetic_coco(
    root: str | Path,
    *,
    num_train: int = 96,
    num_val: int = 24,
    image_size: tuple[int, int] = (160, 224),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic dataset to ``root`` (COCO 2017 layout) unless a complete copy with the same
    parameters is already there. Written into a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a half-written dataset."""
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "image_size": list(image_size), "seed": seed, "version": _VERSION}
    marker = root / _MARKER
    if marker.is_file() and not overwrite:
        try:
            if json.loads(marker.read_text()) == params:
                return root
        except (OSError, json.JSONDecodeError):
            pass
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "annotations").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in SYNTHETIC_CATEGORIES]
    ann_id = 1
    for split, n, first_id in (("train2017", num_train, 1000), ("val2017", num_val, 900_000)):
        (tmp / split).mkdir()
        images, annotations, ann_id = _draw_split(rng, tmp / split, first_id, n, tuple(image_size), ann_id)
        data = {
            "info": {"description": "effdense synthetic shapes", "version": str(_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    (tmp / _MARKER).write_text(json.dumps(params))  # written last: marks the copy complete
    if root.exists():
        shutil.rmtree(root)
    try:
        os.replace(tmp, root)
    except OSError:
        # Another process finished first; keep its (identical) copy.
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():
            raise
    return root


def synthetic_coco_root(cache_dir: str | Path, **params) -> Path:
    """Generate (once) and return the synthetic dataset for ``params`` under ``cache_dir``; each parameter
    set gets its own sub-folder."""
    defaults = {"num_train": 96, "num_val": 24, "image_size": (160, 224), "seed": 0}
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"unknown synthetic dataset parameters: {sorted(unknown)}")
    full = {**defaults, **params}
    full["image_size"] = tuple(int(v) for v in full["image_size"])
    key = json.dumps({**full, "image_size": list(full["image_size"]), "version": _VERSION}, sort_keys=True)
    name = hashlib.sha1(key.encode()).hexdigest()[:10]
    return write_synthetic_coco(Path(cache_dir).expanduser() / name, **full)
