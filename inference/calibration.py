"""Calibration images for INT8 export: real images of the checkpoint's dataset (or of a folder) put through the
pre-processing the exported graph expects (the letterbox of :class:`inference.Predictor`, at the export size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["calibration_batches"]


def _split_images(config: dict[str, Any], split: str, count: int, seed: int) -> tuple[list[np.ndarray], str]:
    """``count`` images of the ``train`` or ``val`` split of the stored dataset, a seeded sample; and its source."""
    from hydra.utils import instantiate

    from datasets.errors import DatasetError

    data = config.get("data")
    if not data or "_target_" not in data:
        raise DatasetError("the checkpoint's config holds no dataset to calibrate on: give calib_dir=FOLDER")
    datamodule = instantiate(data)
    datamodule.prepare_data()
    name = getattr(datamodule, f"{split}_split")
    datamodule.check((name,))
    ds = datamodule.dataset(name, train=False)
    order = np.random.default_rng(seed).permutation(len(ds))[:count]
    return [ds.read_image(int(i)) for i in sorted(order)], f"{datamodule.describe(name)['root']} split {name}"


def calibration_batches(config: dict[str, Any], *, image_size: tuple[int, int], batch_size: int, count: int,
                        split: str = "train", folder: str | None = None, seed: int = 0,
                        ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``count`` calibration images as float ``[batch_size, 3, H, W]`` batches (RGB 0..255, letterboxed into
    ``image_size``; the last batch filled up by repeating images), and a description of what was used."""
    from datasets import build_eval_transform
    from datasets.errors import DatasetNotFoundError

    from .predictor import list_images, read_rgb

    if count < 1:
        raise ValueError(f"calib_images must be >= 1, got {count}")
    if split not in ("train", "val"):
        raise ValueError(f"calib_split must be train or val, got {split!r}")
    if folder:
        try:
            paths = list_images(folder)
        except FileNotFoundError as err:
            raise DatasetNotFoundError(f"{err} (calib_dir=...)") from None
        picked = [paths[int(i)] for i in sorted(np.random.default_rng(seed).permutation(len(paths))[:count])]
        images, source = [read_rgb(p) for p in picked], str(Path(folder))
    else:
        images, source = _split_images(config, split, count, seed)
    transform = build_eval_transform(image_size=image_size)
    empty_boxes, empty_labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    arrays = [transform(im, empty_boxes, empty_labels)["image"].transpose(2, 0, 1) for im in images]
    while len(arrays) % batch_size:
        arrays.append(arrays[len(arrays) % len(images)])
    batches = [np.stack(arrays[i : i + batch_size]).astype(np.float32) for i in range(0, len(arrays), batch_size)]
    used = {"images": len(images), "source": source, "split": None if folder else split,
            "preprocessing": f"letterbox to {list(image_size)}"}
    return batches, used
