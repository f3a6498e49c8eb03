"""Inference from a checkpoint: ``Predictor.from_checkpoint(path)(images)`` on image files, arrays or tensors.

Detection results are boxes ``[x1, y1, x2, y2]`` in original image pixels with scores, labels and class names;
segmentation results are class maps at the original image size. The model, its pre-processing and its
post-processing all come from the checkpoint's stored config, so nothing else needs to be repeated.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from tasks.checkpoint import (
    CheckpointError,
    apply_overrides,
    read_checkpoint,
    stored_normalization,
    without_backbone_init,
    without_retired,
)
from tasks.config_checks import ConfigError
from utils.sizes import image_hw, stride_error

from .fast_paths import FastPaths, optimize_model

__all__ = ["IMAGE_SUFFIXES", "Predictor", "list_images", "read_rgb"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

ImageInput = str | os.PathLike | np.ndarray | torch.Tensor


def list_images(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """An image file, a folder (its images, sorted, not recursive) or a list of those -> image paths."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return paths


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB, its pixels as stored (EXIF orientation not applied, as the datasets read
    them for training and evaluation); ``ValueError`` naming the file when it cannot be decoded."""
    import cv2

    buf = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if buf.size else None
    if image is None:
        raise ValueError(f"{path}: cannot be decoded as an image (corrupt or truncated file?)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _as_rgb_array(item: ImageInput) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        return read_rgb(item)
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W], got {tuple(item.shape)}")
        t = item.detach().cpu()
        if t.dtype != torch.uint8:  # float in [0, 1]
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return t.permute(1, 2, 0).contiguous().numpy()
    array = np.asarray(item)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"an image array must be HxWx3 uint8 RGB, got {array.shape} {array.dtype}")
    return array


class Predictor:
    """A task (with its model) in eval mode plus the pre-processing its config describes.

    Args:
        task: a :class:`tasks.DetectionTask` or :class:`tasks.SegmentationTask` holding the model.
        config: the run config (resolved dict) the task was built from.
        class_names: names of the labels, in label order.
        device: where to run.
        fast: inference speed-ups (:class:`inference.fast_paths.FastPaths`; by default BatchNorm folding,
            channels-last and, on CUDA, bf16 autocast; no compilation, since image sizes vary). They apply to
            a copy of the model: ``task`` is not changed. ``FastPaths(fold_bn=False, channels_last=False,
            precision="fp32")`` predicts exactly as evaluation does.
        image_size: detection: the input size to letterbox images into, one side or ``(H, W)``, each a multiple
            of the finest stride; ``None``: the model's training size (``model.image_size``). Anchors follow the
            feature maps, so a model runs at sizes other than the one it was trained at.
    """

    def __init__(self, task, *, config: dict[str, Any], class_names: Sequence[str] | None = None,
                 device: str | torch.device = "cpu", fast: FastPaths | None = None,
                 image_size: int | Sequence[int] | None = None) -> None:
        from tasks.segmentation import SegmentationTask

        self.device = torch.device(device)
        self.fast = (fast or FastPaths(compile=False)).resolve(self.device)
        if self.fast.compile:
            raise ValueError("Predictor does not compile (image sizes vary); use inference.fast_paths.prepare_predictor")
        self.task = task.eval()
        if self.fast.fold_bn or self.fast.channels_last:
            fast_model, _ = optimize_model(task.model, self.fast, self.device)
            # Copy the task around the new model (the memo stands it in for the old one: no second model copy).
            self.task = copy.deepcopy(task, memo={id(task.model): fast_model}).eval()
        self.task.to(self.device)
        self.config = config
        self.kind = "segmentation" if isinstance(task, SegmentationTask) else "detection"
        num_classes = int(task.num_classes)
        names = list(class_names) if class_names else []
        self.class_names = names if len(names) == num_classes else [f"class_{i}" for i in range(num_classes)]
        model = task.model
        self.size_divisor = max(s.stride for s in model.out_specs.values())
        #: What each input side must be a multiple of: detection the finest stride (coarser maps round up, their
        #: anchors follow), segmentation the coarsest (its batches are padded to it).
        self.input_stride = min(s.stride for s in model.out_specs.values()) if self.kind == "detection" \
            else self.size_divisor
        data = config.get("data") or {}
        self.eval_size = data.get("eval_size") if self.kind == "segmentation" else None
        #: Detection: the ``(H, W)`` images are letterboxed into; ``None`` for segmentation (``eval_size`` applies).
        self.image_size: tuple[int, int] | None = None
        # The evaluation pre-processing the model was trained for (built once, used for every batch).
        if self.kind == "detection":
            from datasets import build_eval_transform

            if image_size is None:
                image_size = getattr(model, "image_size", None) or (config.get("model") or {}).get("image_size")
            error = stride_error(image_size, self.input_stride, name="image_size",
                                 why=", the model's finest stride")
            if error:
                raise ConfigError(error)
            self.image_size = image_hw(image_size)
            self.transform = build_eval_transform(image_size=image_size)
        elif image_size is not None:
            raise ConfigError("image_size applies to detection; a segmentation model predicts at data.eval_size "
                             "(e.g. overrides=['data.eval_size=[1024,2048]'])")
        else:
            from datasets import build_segmentation_eval_transform

            self.transform = build_segmentation_eval_transform(eval_size=self.eval_size)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", overrides: Sequence[str] = (),
        fast: FastPaths | None = None, image_size: int | Sequence[int] | None = None,
    ) -> Predictor:
        """Build the model the checkpoint describes, load its (EMA) weights; ``overrides`` are ``key=value``
        changes of the stored config (e.g. ``task.module.postprocess.iou_threshold=0.6``); ``image_size`` (detection)
        runs the model at another input size than it was trained at (see the class docstring)."""
        from hydra.utils import instantiate

        from tasks.config import register_resolvers
        from tasks.runner import load_checkpoint_weights

        register_resolvers()
        ckpt = read_checkpoint(path)
        stored = ckpt.get("effdense_config")
        if not stored:
            raise CheckpointError(
                f"{path}: holds no model config (effdense_config); it was not written by this project's training "
                "or tools/convert_weights.py"
            )
        cfg = without_backbone_init(without_retired(OmegaConf.create(stored_normalization(dict(stored)))))
        apply_overrides(cfg, list(overrides))
        model = instantiate(cfg.model)
        task = instantiate(cfg.task.module, model=model)
        load_checkpoint_weights(task.model, ckpt, source=path)
        config = OmegaConf.to_container(cfg, resolve=True)
        return cls(task, config=config, class_names=ckpt.get("effdense_class_names"), device=device, fast=fast,
                   image_size=image_size)

    # ------------------------------------------------------------------ batches
    def _detection_batch(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        outs = [self.transform(im, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)) for im in images]
        return {
            "images": torch.stack([torch.from_numpy(o["image"].transpose(2, 0, 1).copy()) for o in outs]),
            "scales": torch.tensor([o["scale"] for o in outs], dtype=torch.float32),
            "orig_sizes": torch.tensor([im.shape[:2] for im in images], dtype=torch.int64).reshape(-1, 2),
        }

    def _segmentation_batch(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        from datasets import collate_segmentation

        samples = []
        for i, im in enumerate(images):
            out = self.transform(im, np.zeros(im.shape[:2], np.uint8))
            samples.append({
                "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
                "mask": torch.full((1, 1), 255, dtype=torch.uint8),
                "index": i,
                "orig_size": im.shape[:2],
                "valid_size": out["image"].shape[:2],
            })
        return collate_segmentation(samples, size_divisor=self.size_divisor)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.fast.channels_last:
            batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
        return batch

    @torch.no_grad()
    def predict_arrays(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """HxWx3 uint8 RGB arrays -> one result dict per image (see :meth:`__call__`)."""
        if not images:
            return []
        if self.kind == "detection":
            batch = self._detection_batch(images)
            batch = self._to_device(batch)
            with self.fast.autocast(self.device):
                det = self.task.predict_batch(batch)
            results = []
            for b in range(len(images)):
                n = int(det["num_detections"][b])
                labels = det["labels"][b, :n].cpu().tolist()
                results.append({
                    "boxes": det["boxes"][b, :n].float().cpu().tolist(),
                    "scores": det["scores"][b, :n].float().cpu().tolist(),
                    "labels": labels,
                    "names": [self.class_names[k] for k in labels],
                })
            return results
        batch = self._segmentation_batch(images)
        batch = self._to_device(batch)
        with self.fast.autocast(self.device):
            preds = self.task.predict_batch(batch)
        return [{"mask": p.to(torch.uint8).cpu().numpy()} for p in preds]

    def __call__(self, inputs: ImageInput | Sequence[ImageInput], *, batch_size: int = 4) -> list[dict[str, Any]]:
        """Predict on image paths, HxWx3 uint8 RGB arrays or [3, H, W] tensors (uint8, or float in [0, 1]).

        Detection: ``{"boxes": [[x1, y1, x2, y2], ...] (original pixels), "scores", "labels", "names"}`` per
        image, best first. Segmentation: ``{"mask": HxW uint8 class map}`` at the original size.
        """
        single = isinstance(inputs, (str, os.PathLike, np.ndarray)) or (
            isinstance(inputs, torch.Tensor) and inputs.ndim == 3
        )
        items = [inputs] if single else list(inputs)
        results: list[dict[str, Any]] = []
        for start in range(0, len(items), batch_size):
            chunk = [_as_rgb_array(item) for item in items[start : start + batch_size]]
            results.extend(self.predict_arrays(chunk))
        return results
