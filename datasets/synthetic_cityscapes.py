"""Built-in synthetic street scenes: a real Cityscapes-layout folder, written once into a cache.

Tests and the quick start read it with :class:`datasets.CityscapesSegmentation`, the loader real Cityscapes
uses. Each scene has sky at the top, buildings and trees along a horizon, a road with sidewalks at the bottom,
cars, persons, poles with traffic signs, and ignored regions (``unlabeled`` patches, the ``ego vehicle`` strip at
the very bottom, ``static`` boxes, ``dynamic`` blobs). Every label has its own colour with mild texture and
noise, so a tiny network can learn to segment the scenes from colour alone.

Layout::

    root/leftImg8bit/{train,val}/<city>/<city>_<seq:06d>_000019_leftImg8bit.png
    root/gtFine/{train,val}/<city>/<city>_<seq:06d>_000019_gtFine_labelIds.png
    root/synthetic.json            # written last: the generator parameters, marks the copy complete
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ._cache import cached_root, write_atomically

__all__ = ["SYNTHETIC_CITYSCAPES_COLOURS", "synthetic_cityscapes_root", "write_synthetic_cityscapes"]

_VERSION = 1  # bump when the generated content changes, so cached copies are regenerated
_FRAME = 19  # the annotated frame of every Cityscapes snippet

#: Label id -> the base RGB colour its pixels are painted with (each label its own, well-separated colour).
SYNTHETIC_CITYSCAPES_COLOURS: dict[int, tuple[int, int, int]] = {
    0: (20, 20, 20),  # unlabeled (ignored)
    1: (70, 40, 10),  # ego vehicle (ignored)
    4: (150, 60, 200),  # static (ignored)
    5: (120, 90, 30),  # dynamic (ignored)
    7: (60, 60, 75),  # road
    8: (195, 170, 150),  # sidewalk
    11: (120, 105, 95),  # building
    17: (245, 245, 245),  # pole
    20: (240, 210, 0),  # traffic sign
    21: (50, 140, 40),  # vegetation
    23: (130, 190, 240),  # sky
    24: (210, 30, 60),  # person
    26: (20, 50, 180),  # car
}
_PALETTE = np.zeros((256, 3), dtype=np.float32)
for _id, _colour in SYNTHETIC_CITYSCAPES_COLOURS.items():
    _PALETTE[_id] = _colour
del _id, _colour


def _box(labels: np.ndarray, value: int, x0: float, y0: float, x1: float, y1: float) -> None:
    h, w = labels.shape
    xa, xb = int(np.clip(round(x0), 0, w)), int(np.clip(round(x1), 0, w))
    ya, yb = int(np.clip(round(y0), 0, h)), int(np.clip(round(y1), 0, h))
    labels[ya:yb, xa:xb] = value


def _draw_labels(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """The label-id map of one random street scene."""
    lab = np.full((h, w), 23, dtype=np.uint8)  # sky
    horizon = int(h * rng.uniform(0.45, 0.6))  # where the road starts
    # Buildings: blocks with varying roof lines, standing on the horizon.
    x = 0.0
    while x < w:
        bw = w * rng.uniform(0.1, 0.3)
        if rng.random() < 0.85:
            _box(lab, 11, x, h * rng.uniform(0.08, 0.35), x + bw, horizon)
        x += bw
    # Trees in front of the buildings.
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, w), horizon - h * rng.uniform(0.05, 0.2)
        axes = (max(2, round(w * rng.uniform(0.04, 0.1))), max(2, round(h * rng.uniform(0.08, 0.16))))
        cv2.ellipse(lab, (round(cx), round(cy)), axes, 0, 0, 360, 21, -1)
    # Road and sidewalks (trapezoids widening towards the camera).
    lab[horizon:] = 7
    for side in (0, 1):
        top, bottom = w * rng.uniform(0.05, 0.2), w * rng.uniform(0.2, 0.35)
        poly = np.array([[0, horizon], [top, horizon], [bottom, h], [0, h]], dtype=np.float64)
        if side:
            poly[:, 0] = w - poly[:, 0]
        cv2.fillPoly(lab, [np.round(poly).astype(np.int32)], 8)
    # Static objects (ignored) on the sidewalks.
    for _ in range(int(rng.integers(0, 3))):
        cx, cy, s = rng.uniform(0, 0.15 * w), rng.uniform(horizon, h), h * rng.uniform(0.03, 0.07)
        cx = cx if rng.random() < 0.5 else w - cx
        _box(lab, 4, cx - s, cy - s, cx + s, cy + s)
    # Poles with traffic signs, standing on the sidewalks.
    pole_w = max(2.0, w / 100)
    for _ in range(int(rng.integers(1, 4))):
        px = rng.uniform(0.02, 0.18) * w
        px = px if rng.random() < 0.5 else w - px
        top, foot = h * rng.uniform(0.15, 0.35), horizon + h * rng.uniform(0.05, 0.2)
        _box(lab, 17, px - pole_w / 2, top, px + pole_w / 2, foot)
        if rng.random() < 0.8:
            s = max(3.0, w * rng.uniform(0.02, 0.035))
            _box(lab, 20, px - s, top - s, px + s, top + s)
    # Cars on the road: further away = higher up and smaller.
    for _ in range(int(rng.integers(1, 4))):
        t = rng.uniform(0.15, 0.8)
        bottom = horizon + t * (h - horizon)
        ch = h * (0.06 + 0.14 * t)
        cw = ch * rng.uniform(1.5, 2.2)
        cx = rng.uniform(0.2, 0.8) * w
        _box(lab, 26, cx - cw / 2, bottom - ch, cx + cw / 2, bottom)
    # Persons on the sidewalks.
    for _ in range(int(rng.integers(1, 4))):
        t = rng.uniform(0.1, 0.9)
        bottom = horizon + t * (h - horizon)
        ph = h * (0.1 + 0.15 * t)
        pw = max(2.0, ph * rng.uniform(0.25, 0.4))
        px = rng.uniform(0.03, 0.2) * w
        px = px if rng.random() < 0.5 else w - px
        cv2.ellipse(
            lab,
            (round(px), round(bottom - ph / 2)),
            (max(1, round(pw / 2)), max(1, round(ph / 2))),
            0,
            0,
            360,
            24,
            -1,
        )
    # Dynamic objects (ignored) and unlabeled patches anywhere.
    for _ in range(int(rng.integers(0, 2))):
        r = max(2, round(h * rng.uniform(0.02, 0.05)))
        cv2.circle(lab, (round(rng.uniform(0, w)), round(rng.uniform(horizon, h))), r, 5, -1)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        _box(lab, 0, cx, cy, cx + w * rng.uniform(0.02, 0.06), cy + h * rng.uniform(0.02, 0.06))
    # The ego vehicle's bonnet along the bottom edge.
    lab[h - max(1, round(h * rng.uniform(0.04, 0.08))) :] = 1
    return lab


def _paint(rng: np.random.Generator, lab: np.ndarray) -> np.ndarray:
    """RGB image of a label map: each label's colour, a per-image tint, smooth texture and pixel noise."""
    h, w = lab.shape
    img = _PALETTE[lab] + rng.uniform(-10, 10, size=3).astype(np.float32)
    coarse = rng.normal(0, 6, size=(6, 8, 1)).astype(np.float32)
    img += cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
    img += rng.normal(0, 5, size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def _generate(tmp: Path, params: dict) -> None:
    h, w = params["height"], params["width"]
    for split_index, (split, n, cities) in enumerate(
        (
            ("train", params["num_train"], params["train_cities"]),
            ("val", params["num_val"], params["val_cities"]),
        )
    ):
        for i in range(n):
            city, seq = cities[i % len(cities)], i // len(cities)
            image_dir = tmp / "leftImg8bit" / split / city
            mask_dir = tmp / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            # One random stream per image: the other images do not change when the counts do.
            rng = np.random.default_rng([params["seed"], split_index, i])
            lab = _draw_labels(rng, h, w)
            img = _paint(rng, lab)
            stem = f"{city}_{seq:06d}_{_FRAME:06d}"
            _write_png(image_dir / f"{stem}_leftImg8bit.png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            _write_png(mask_dir / f"{stem}_gtFine_labelIds.png", lab)


def _params(
    *,
    num_train: int,
    num_val: int,
    height: int,
    width: int,
    seed: int,
    train_cities: Sequence[str],
    val_cities: Sequence[str],
) -> dict:
    """The validated, canonical generator parameters (what the marker file holds)."""
    num_train, num_val, height, width, seed = (int(v) for v in (num_train, num_val, height, width, seed))
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    if height < 32 or width < 32:
        raise ValueError(f"height and width must be >= 32, got {height}x{width}")
    cities = {}
    for name, value in (("train_cities", train_cities), ("val_cities", val_cities)):
        if isinstance(value, str) or not len(value) or not all(isinstance(c, str) for c in value):
            raise ValueError(f"{name} must be a non-empty sequence of city names, got {value!r}")
        bad = [c for c in value if not c or any(ch in c for ch in "_/\\.") or c.strip() != c]
        if bad or len(set(value)) != len(value):
            raise ValueError(
                f"{name} must be distinct names without '_', '/', '\\' or '.', got {list(value)!r}"
            )
        cities[name] = list(value)
    return {
        "dataset": "cityscapes",
        "num_train": num_train,
        "num_val": num_val,
        "height": height,
        "width": width,
        "seed": seed,
        **cities,
        "version": _VERSION,
    }


def write_synthetic_cityscapes(
    root: str | Path,
    *,
    num_train: int = 16,
    num_val: int = 4,
    height: int = 128,
    width: int = 256,
    seed: int = 0,
    train_cities: Sequence[str] = ("aachen", "bremen"),
    val_cities: Sequence[str] = ("frankfurt",),
    overwrite: bool = False,
) -> Path:
    """Write synthetic street scenes to ``root`` in the Cityscapes layout and return ``root``.

    ``height x width`` images; the images of a split are dealt to its cities in turn. The content depends only
    on the parameters (deterministic for a ``seed``). If ``root`` already holds a complete copy written with the
    same parameters, nothing is written. The data is generated in a temporary sibling folder and renamed into
    place, so an interrupted run never leaves a half-written dataset. An existing folder that this generator did
    not write is only replaced with ``overwrite=True``.
    """
    params = _params(
        num_train=num_train,
        num_val=num_val,
        height=height,
        width=width,
        seed=seed,
        train_cities=train_cities,
        val_cities=val_cities,
    )
    return write_atomically(root, params, lambda tmp: _generate(tmp, params), overwrite=overwrite)


def synthetic_cityscapes_root(cache_dir: str | Path, **params) -> Path:
    """Generate (once) and return the synthetic Cityscapes folder for ``params`` (the keyword arguments of
    :func:`write_synthetic_cityscapes`) under ``cache_dir``, in a sub-folder ``cityscapes-<hash of params>``, so
    different parameters never share (or overwrite) a copy. Safe when several processes call it at once."""
    return cached_root(
        cache_dir, prefix="cityscapes", writer=write_synthetic_cityscapes, normalize=_params, params=params
    )
