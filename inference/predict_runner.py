"""``tools/predict.py``: run a checkpoint on image files and write predictions.json and pictures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import torch
from omegaconf import DictConfig, OmegaConf

from datasets.drawing import draw_detections, overlay_segmentation
from evaluation.seg_writer import write_image_atomic
from utils.files import atomic_write_json

from .fast_paths import FastPaths
from .onnx_model import OnnxPredictor, check_model_source
from .predictor import Predictor, list_images, read_rgb

__all__ = ["output_names", "predict"]

log = logging.getLogger(__name__)


def predict(cfg: DictConfig, run_dir: str | Path) -> list[dict[str, Any]]:
    """Predict on ``cfg.inputs`` with ``cfg.ckpt`` (or the exported ``cfg.onnx``); returns the entries written to predictions.json."""
    from tasks.config_checks import check_predict_config

    check_predict_config(cfg)
    run_dir = Path(run_dir)
    torch.set_flush_denormal(True)
    try:
        paths = list_images(cfg.inputs)
    except FileNotFoundError as err:
        from datasets.errors import DatasetNotFoundError

        raise DatasetNotFoundError(f"{err} (inputs=...)") from None
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = list(OmegaConf.to_container(cfg.config_overrides, resolve=True) or [])
    fast = FastPaths(compile=False, **OmegaConf.to_container(cfg.fast)) if "fast" in cfg else None
    size = cfg.get("image_size")
    size = OmegaConf.to_container(size) if OmegaConf.is_config(size) else size
    if check_model_source(cfg) == "onnx":
        if size is not None:
            from tasks.config_checks import ConfigError

            raise ConfigError(f"{cfg.onnx}: an exported graph has a fixed input size; leave image_size out")
        predictor = OnnxPredictor(cfg.onnx)
    else:
        predictor = Predictor.from_checkpoint(cfg.ckpt, device=device, overrides=overrides, fast=fast,
                                              image_size=size)
    names = predictor.class_names
    vis_dir = run_dir / "visualizations"
    mask_dir = run_dir / "masks"
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.visualize:
        vis_dir.mkdir(exist_ok=True)
    if predictor.kind == "segmentation":
        mask_dir.mkdir(exist_ok=True)
    entries: list[dict[str, Any]] = []
    out_names = output_names(paths)
    batch = int(cfg.batch_size)
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        images = []
        for path in chunk:
            try:
                images.append(read_rgb(path))
            except ValueError as err:
                from datasets.errors import DatasetError

                raise DatasetError(str(err)) from None
        for path, image, result in zip(chunk, images, predictor.predict_arrays(images)):
            entry: dict[str, Any] = {"file_name": str(path)}
            if predictor.kind == "detection":
                keep = [i for i, s in enumerate(result["scores"]) if s >= cfg.score_threshold]
                for key in ("boxes", "scores", "labels", "names"):
                    entry[key] = [result[key][i] for i in keep]
                picture = draw_detections(image, entry["boxes"], entry["scores"], entry["labels"], names)
            else:
                mask = result["mask"]
                write_image_atomic(mask_dir / f"{out_names[path]}.png", mask)
                entry["mask"] = str(Path("masks") / f"{out_names[path]}.png")
                entry["classes"] = [names[int(k)] for k in sorted(set(mask.reshape(-1).tolist())) if k < len(names)]
                picture = overlay_segmentation(image, mask, names)
            if cfg.visualize:
                write_image_atomic(vis_dir / f"{out_names[path]}.png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                entry["visualization"] = str(Path("visualizations") / f"{out_names[path]}.png")
            entries.append(entry)
    atomic_write_json(run_dir / "predictions.json", entries)
    log.info("wrote predictions for %d images to %s", len(entries), run_dir)
    print(f"{len(entries)} images -> {run_dir / 'predictions.json'}", flush=True)
    return entries


def output_names(paths: list[Path]) -> dict[Path, str]:
    """The name each input's pictures are written under: its stem, or where stems repeat (``camA/0001.jpg`` and
    ``camB/0001.jpg``, ``frame.jpg`` and ``frame.png``) its path below the inputs' common folder, with ``__`` for
    each separator (``camA__0001.jpg``), so that no output overwrites another."""
    import os
    from collections import Counter

    stems = Counter(p.stem for p in paths)
    common = Path(os.path.commonpath([str(p.resolve().parent) for p in paths])) if paths else Path()
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for p in paths:
        name = p.stem if stems[p.stem] == 1 else "__".join(p.resolve().relative_to(common).parts)
        base, n = name, 1
        while name in taken:  # a stem equal to another input's flattened path
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names[p] = name
    return names
