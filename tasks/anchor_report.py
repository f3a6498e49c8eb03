"""``tools/anchors.py``: how many of a dataset's training boxes get a positive anchor at the model's input size, by
size, and an ``anchors.anchor_scale`` / ``anchors.aspect_ratios`` override that gives more of them one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from datasets.inspection import detection_targets
from heads.anchor_fit import SIZE_BUCKETS, propose_anchors
from utils.files import atomic_write_json
from utils.sizes import image_hw

from .config_checks import ConfigError, check_input_size

__all__ = ["REPORT_FILE", "anchor_report", "input_size", "letterboxed_boxes", "override_line"]

REPORT_FILE = "anchors.json"


def input_size(image_size) -> tuple[int, int]:
    """``model.image_size`` (one side, or ``[H, W]``) as ``(H, W)``."""
    if OmegaConf.is_config(image_size):
        image_size = OmegaConf.to_container(image_size, resolve=True)
    try:
        return image_hw(image_size, name="model.image_size")
    except ValueError as err:
        raise ConfigError(str(err)) from err


def letterboxed_boxes(ds, size: tuple[int, int], max_images: int | None = None) -> tuple[torch.Tensor, int]:
    """The training boxes of detection dataset ``ds`` at the model input ``size`` (H, W) as evaluation letterboxes
    each image (scaled by ``min(H / h, W / w)``): ``[N, 4]`` float64, and the number of images read."""
    count = len(ds) if max_images is None else min(int(max_images), len(ds))
    parts = []
    for boxes, _, (h, w) in detection_targets(ds, range(count)):
        if len(boxes):
            parts.append(boxes * min(size[0] / h, size[1] / w))
    boxes = np.concatenate(parts) if parts else np.zeros((0, 4))
    return torch.from_numpy(boxes), count


def override_line(scale: float, ratios: list[list[float]]) -> str:
    """The command-line overrides that set these anchors."""
    pairs = ",".join(f"[{x:g},{y:g}]" for x, y in ratios)
    return f"anchors.anchor_scale={scale:g} 'anchors.aspect_ratios=[{pairs}]'"


def _table(title: str, report: dict[str, Any], threshold: float) -> list[str]:
    lines = [title, f"  {'':<8} {'boxes':>9} {f'IoU>={threshold:g}':>9} {'low-quality':>12} {'median IoU':>11}"]
    for name in ("all", *(name for name, _ in SIZE_BUCKETS)):
        r = report[name]
        if not r["boxes"]:
            lines.append(f"  {name:<8} {0:>9}")
            continue
        lines.append(f"  {name:<8} {r['boxes']:>9} {r['share_iou_at_threshold']:>9.1%} {r['share_low_quality']:>12.1%} "
                     f"{r['median_best_iou']:>11.3f}")
    return lines


def anchor_report(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Print the anchor fit of the training split and a proposal; write :data:`REPORT_FILE` into ``run_dir`` (an
    existing one is an error, never overwritten)."""
    if cfg.task.name != "detection":
        raise ConfigError(f"tools/anchors.py fits detection anchors, but task={cfg.task.name}")
    path = Path(run_dir) / REPORT_FILE
    if path.exists():
        raise FileExistsError(f"{path} already exists: choose another hydra.run.dir (nothing is overwritten)")
    check_input_size(cfg)
    size = input_size(cfg.model.image_size)
    datamodule = instantiate(cfg.data)
    split = datamodule.train_split
    datamodule.check((split,))
    ds = datamodule.dataset(split, train=False)  # targets read without images; else boxes map back from eval samples
    boxes, images = letterboxed_boxes(ds, size, cfg.max_images)
    if not len(boxes):
        raise ConfigError(f"{split}: no training boxes in the first {images} images")
    generator = instantiate(cfg.anchors)
    levels = list(range(int(cfg.task.min_level), int(cfg.neck.max_level) + 1))
    matcher = cfg.task.module.assigner.matcher
    threshold = float(matcher.threshold)
    scales = None if cfg.scales is None else [float(s) for s in cfg.scales]
    result = propose_anchors(boxes, generator, size, levels, threshold=threshold, scales=scales,
                             search_boxes=int(cfg.search_boxes), seed=int(cfg.seed))
    improves = result["proposed"]["all"]["share_iou_at_threshold"] > result["current"]["all"]["share_iou_at_threshold"]
    report = {
        "split": split, "root": str(datamodule.data_dir), "images": images, "boxes": len(boxes),
        "image_size": list(size), "levels": levels,
        "boxes_at": "the model input: each image scaled by min(H / h, W / w), as evaluation letterboxes it",
        "positive": f"an anchor with IoU >= {threshold:g} with the box (the matcher's threshold)",
        "low_quality": ("a box that overlaps any anchor also gets its best one, whatever the IoU (the matcher's "
                        f"allow_low_quality, {'on' if matcher.allow_low_quality else 'off'} in this config)"),
        "size_buckets": "box area at the model input: small < 32^2, medium < 96^2, large from there up",
        "current_anchors": {"anchor_scale": generator.anchor_scale, "num_scales": generator.num_scales,
                            "aspect_ratios": [list(r) for r in generator.aspect_ratios]},
        **result,
        "override": override_line(result["anchor_scale"], result["aspect_ratios"]) if improves else None,
    }
    atomic_write_json(path, report, indent=2)
    h, w = size
    lines = [
        (f"anchor fit: {len(boxes)} training boxes of {images} images ({split}) at the model input {h}x{w} (each "
         f"image scaled by min({h}/h, {w}/w)), levels p{levels[0]}-p{levels[-1]}"),
        f"positive: {report['positive']}; low-quality: {report['low_quality']}",
        f"size buckets: {report['size_buckets']}",
        *_table(f"current: {override_line(generator.anchor_scale, report['current_anchors']['aspect_ratios'])}",
                result["current"], threshold),
        *(_table("proposed:", result["proposed"], threshold) + [f"override: {report['override']}"] if improves
          else ["the current anchors are the best of the candidates tried: no change proposed"]),
        f"wrote {path}",
    ]
    print("\n".join(lines), flush=True)
    return report
