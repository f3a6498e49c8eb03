"""The benchmark's options (configs/benchmark.yaml) read and checked: device, input sizes, batches, counts."""

from __future__ import annotations

from dataclasses import replace

import torch
from omegaconf import DictConfig

from inference.fast_paths import FastPaths

__all__ = [
    "GPU_PREDICT_BATCH",
    "GPU_TRAIN_BATCH",
    "BenchmarkError",
    "batch_sizes",
    "effdet_paths",
    "image_size",
    "int_option",
    "resolve_device",
    "train_boxes",
    "train_image_size",
]


class BenchmarkError(ValueError):
    """A benchmark request that cannot be carried out (unknown measure, no effdet equivalent, no CUDA)."""


#: Batches used on a GPU when none is given: the sizes effdet's published measurements used.
GPU_PREDICT_BATCH = {"d0": 32, "d1": 32, "d2": 16, "d3": 16, "d4": 8, "d5": 4, "d6": 4, "d7": 2, "d7x": 2}
GPU_TRAIN_BATCH = {"d0": 32, "d1": 16, "d2": 16, "d3": 8, "d4": 4, "d5": 2, "d6": 2, "d7": 1, "d7x": 1}


def int_option(cfg: DictConfig, name: str, least: int, default: int | None = None) -> int:
    """``cfg[name]`` (``default`` when absent); :class:`BenchmarkError` unless it is an integer >= ``least``."""
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise BenchmarkError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


def train_boxes(cfg: DictConfig) -> int:
    """Random boxes per training image (detection)."""
    return int_option(cfg, "train_boxes", 1, default=8)


def resolve_device(name: str) -> torch.device:
    """``device`` as a torch device (``auto``: CUDA when available); CUDA asked for without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("device=cuda but CUDA is not available here; use device=cpu")
    return device


def image_size(cfg: DictConfig, task_name: str) -> tuple[int, int]:
    """The input size of prediction: ``image_size``, else the model's resolution (detection) or 1024x2048."""
    size = cfg.image_size
    if size is None:
        size = [1024, 2048] if task_name == "segmentation" else cfg.model.image_size
    return _side_pair(size, "image_size", task_name)


def _side_pair(size, name: str, task_name: str) -> tuple[int, int]:
    """``size`` (a side or ``[H, W]``) as ``(H, W)``, each a multiple of the stride inputs need: detection the
    finest, 8 (coarser maps round up, as EfficientDet-Lite0's 320 px needs), segmentation the coarsest, 128."""
    h, w = (size, size) if isinstance(size, int) else (int(s) for s in size)
    stride, which = (8, "finest") if task_name == "detection" else (128, "coarsest")
    if h % stride or w % stride:
        raise BenchmarkError(f"{name} must be a multiple of {stride} (the {which} stride), got {h}x{w}")
    return h, w


def train_image_size(cfg: DictConfig, task_name: str, size: tuple[int, int]) -> tuple[int, int]:
    """The input size of the training measures: ``train_image_size``; else ``image_size`` when given; else what
    training runs at: the model's resolution (detection, the same as predict) or the training crop
    (segmentation: ``data.crop_size``, 512x1024 for Cityscapes, where prediction runs at 1024x2048; padded up to
    a multiple of ``data.size_divisor``, as the training batches are)."""
    chosen = cfg.get("train_image_size")
    if chosen is None:
        crop = cfg.get("data", {}).get("crop_size")
        if cfg.image_size is not None or task_name != "segmentation" or crop is None:
            return size
        from datasets.segmentation import padded_size

        crop = (crop, crop) if isinstance(crop, int) else tuple(int(v) for v in crop)
        return padded_size(crop, int(cfg.data.get("size_divisor") or 128))
    return _side_pair(chosen, "train_image_size", task_name)


def batch_sizes(cfg: DictConfig, device: torch.device, task_name: str) -> tuple[int, int]:
    """The predict and training batches: ``batch_size`` and ``train_batch_size``, else a default per device."""
    if device.type != "cuda":
        auto_predict = auto_train = 2
    elif task_name == "segmentation":
        auto_predict = auto_train = 4
    else:
        auto_predict, auto_train = GPU_PREDICT_BATCH.get(cfg.scale, 8), GPU_TRAIN_BATCH.get(cfg.scale, 4)
    return int(cfg.batch_size or auto_predict), int(cfg.train_batch_size or auto_train)


def effdet_paths(cfg: DictConfig, paths: FastPaths) -> FastPaths:
    """effdet's fast paths in the timed measures: this project's, with ``effdet_compile`` (when set) in place of
    ``fast.compile`` (e.g. this project compiled against effdet eager, without minutes of compiling effdet)."""
    choice = cfg.get("effdet_compile")
    if choice is None:
        return paths
    if not isinstance(choice, bool):
        raise BenchmarkError(f"effdet_compile must be null, true or false, got {choice!r}")
    return replace(paths, compile=choice)
