"""``tools/show_data.py``: contact sheets of a split's samples as the loader delivers them, with their ground truth, and
the split's per-class counts and box sizes, before any GPU hour is spent on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from datasets.inspection import (
    COCO_AREA_LIMITS,
    box_statistics,
    contact_sheet,
    detection_targets,
    draw_tile,
    pixel_counts,
    pixel_statistics,
)
from utils.files import atomic_path, atomic_write_json

from .config_checks import ConfigError, check_input_size

__all__ = ["STATS_FILE", "show_data"]

STATS_FILE = "data_stats.json"


def _split_name(cfg: DictConfig, datamodule) -> str:
    if cfg.split not in ("train", "val"):
        raise ConfigError(f"split must be train or val, got {cfg.split!r}")
    return datamodule.train_split if cfg.split == "train" else datamodule.val_split


def _sample_indices(cfg: DictConfig, length: int) -> list[int]:
    n = min(int(cfg.n), length)
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {cfg.n}")
    if not cfg.shuffle:
        return list(range(n))
    return torch.randperm(length, generator=torch.Generator().manual_seed(int(cfg.seed)))[:n].sort().values.tolist()


def _tile(sample: dict, index: int, class_names, tile_size: int) -> np.ndarray:
    image = sample["image"].permute(1, 2, 0).numpy()
    if "mask" in sample:
        vh, vw = (int(v) for v in sample.get("valid_size", image.shape[:2]))
        return draw_tile(np.ascontiguousarray(image[:vh, :vw]), class_names, tile_size=tile_size,
                         mask=sample["mask"].numpy(), caption=f"#{index}")
    boxes, labels = sample["boxes"].numpy(), sample["labels"].numpy()
    caption = f"#{index} id {sample['image_id']}: {len(labels)}" if "image_id" in sample else f"#{index}: {len(labels)}"
    return draw_tile(image, class_names, tile_size=tile_size, boxes=boxes, labels=labels, caption=caption)


def _stats_dataset(datamodule, ds, split: str, augment: bool):
    """A dataset to count the split's ground truth on: ``ds`` itself where its targets or masks are read without the
    transform, else the split with the evaluation transform (whose boxes map back to original pixels)."""
    direct = all(callable(getattr(ds, name, None)) for name in ("targets", "original_size")) or all(
        callable(getattr(ds, name, None)) for name in ("read_mask", "train_ids"))
    return ds if direct or not augment else datamodule.dataset(split, train=False)


def _detection_stats(ds, indices) -> dict[str, Any]:
    all_boxes, all_labels, empty = [], [], 0
    for boxes, labels, _ in detection_targets(ds, indices):
        all_boxes.append(boxes)
        all_labels.append(labels)
        empty += not len(labels)
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4))
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, dtype=np.int64)
    stats = {"images_without_objects": empty, **box_statistics(boxes, labels, ds.class_names)}
    small, medium = COCO_AREA_LIMITS
    stats["size_buckets_rule"] = (f"box area w*h in original pixels: small < {small}, medium < {medium}, "
                                  "large from there up")
    for name in ("num_crowd", "num_degenerate"):  # left out of the targets (datasets.CocoDetection)
        if hasattr(ds, name):
            stats[name.removeprefix("num_") + "_left_out"] = int(getattr(ds, name))
    return stats


def _print_stats(stats: dict[str, Any]) -> None:
    lines = [f"{stats['split']}: {stats['images']} images"
             + (f" ({stats['images_without_objects']} without objects), {stats['objects']} objects"
                if "objects" in stats else f", {stats['pixels']} pixels ({stats['ignored_pixels']} ignored)")]
    width = max(len(name) for name in stats["per_class"]) if stats["per_class"] else 5
    unit = "objects" if "objects" in stats else "pixels"
    lines.append(f"  {'class':<{width}}  {unit:>12}")
    lines += [f"  {name:<{width}}  {count:>12}" for name, count in stats["per_class"].items()]
    if "size_buckets" in stats:
        b = stats["size_buckets"]
        lines.append(f"  sizes ({stats['size_buckets_rule']}): small {b['small']}, medium {b['medium']}, "
                     f"large {b['large']}")
        for key, label in (("width", "width px"), ("height", "height px"), ("aspect_w_over_h", "aspect w/h")):
            q = stats[key]
            if q:
                lines.append(f"  {label:<10} " + "  ".join(f"{k} {v:g}" for k, v in q.items()))
    print("\n".join(lines), flush=True)


def show_data(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Write ``sheet_000.png``, ... (``columns`` x ``rows`` samples each) and :data:`STATS_FILE` into ``run_dir`` and
    print the statistics; files already there are an error, never overwritten."""
    run_dir = Path(run_dir)
    check_input_size(cfg)
    datamodule = instantiate(cfg.data)
    split = _split_name(cfg, datamodule)
    datamodule.check((split,))
    augment = bool(cfg.augment)
    ds = datamodule.dataset(split, train=augment)
    indices = _sample_indices(cfg, len(ds))
    per_sheet = int(cfg.columns) * int(cfg.rows)
    if per_sheet < 1 or int(cfg.tile_size) < 16:
        raise ConfigError(f"columns and rows must be >= 1 and tile_size >= 16, got {cfg.columns}, {cfg.rows}, "
                          f"{cfg.tile_size}")
    sheets = [run_dir / f"sheet_{k:03d}.png" for k in range((len(indices) + per_sheet - 1) // per_sheet)]
    taken = [p for p in [*sheets, run_dir / STATS_FILE] if p.exists()]
    if taken:
        raise FileExistsError(f"{taken[0]} already exists: choose another hydra.run.dir (nothing is overwritten)")

    class_names = list(ds.class_names)
    loader = DataLoader(ds, batch_size=None, sampler=indices, num_workers=0)  # the samples as the loader gives them
    tiles = [_tile(sample, index, class_names, int(cfg.tile_size)) for index, sample in zip(indices, loader)]
    for k, path in enumerate(sheets):
        sheet = contact_sheet(tiles[k * per_sheet:(k + 1) * per_sheet], columns=int(cfg.columns))
        ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"could not encode {path}")
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.tobytes())

    stats_ds = _stats_dataset(datamodule, ds, split, augment)
    count = len(stats_ds) if cfg.stats_images is None else min(int(cfg.stats_images), len(stats_ds))
    stats: dict[str, Any] = {
        "task": str(cfg.task.name), "split": split, "augment": augment, "root": str(datamodule.data_dir),
        "images": count, "images_in_split": len(stats_ds), "shown": indices, "sheets": [p.name for p in sheets],
    }
    if cfg.task.name == "detection":
        stats.update(_detection_stats(stats_ds, range(count)))
    else:
        counts = pixel_counts(stats_ds, range(count))
        stats.update(pixel_statistics(counts, class_names, getattr(stats_ds, "ignore_index", 255)))
    atomic_write_json(run_dir / STATS_FILE, stats, indent=2)
    _print_stats(stats)
    print(f"wrote {len(sheets)} contact sheet(s) of {len(indices)} {'augmented ' if augment else ''}samples and "
          f"{STATS_FILE} to {run_dir}", flush=True)
    return stats
