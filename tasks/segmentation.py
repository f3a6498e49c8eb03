"""The segmentation task: a plain backbone + neck + segmentation-head module trained with per-pixel
cross-entropy, evaluated with a confusion matrix over the whole split (mIoU), optionally writing one
prediction PNG per image in the dataset's label ids (the Cityscapes submission format) and colour overlays."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evaluation.miou import ConfusionMatrix, format_iou_table
from heads import SegmentationLoss, SegmentationOutput, upsample_logits

from .base import DenseTask

__all__ = ["INFERENCE_MODES", "SegmentationTask"]

log = logging.getLogger(__name__)

INFERENCE_MODES = ("whole", "slide")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = (int(x) for x in v)
    return (a, b)


class SegmentationTask(DenseTask):
    """Trains and evaluates a model that returns :class:`heads.SegmentationOutput`.

    Batches are the dicts of :func:`datasets.collate_segmentation`: ``images`` uint8 ``[B, 3, H, W]`` (padded to
    a multiple of the model's coarsest stride), ``masks`` uint8 train ids (255 = ignore; at crop size in
    training, at the ORIGINAL image size in evaluation), ``valid_sizes``, ``orig_sizes`` and ``indices``.

    Evaluation predicts at full resolution: logits are upsampled to the network input, cropped to the image
    content and resized to the original image size before the argmax, so the confusion matrix is the one an
    evaluation of the written prediction PNGs computes.

    Args:
        model: ``images -> SegmentationOutput``.
        num_classes: classes predicted per pixel.
        loss: the training loss.
        ignore_index: target value excluded from loss and metrics.
        inference: ``"whole"`` (one forward pass per image) or ``"slide"`` (overlapping windows of
            ``slide_crop`` every ``slide_stride`` pixels, logits averaged where they overlap).
        **kwargs: optimizer, schedule, memory format and normalisation (see :class:`tasks.base.DenseTask`).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        num_classes: int,
        loss: SegmentationLoss,
        ignore_index: int = 255,
        inference: str = "whole",
        slide_crop: int | Sequence[int] = (1024, 1024),
        slide_stride: int | Sequence[int] = (768, 768),
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, **kwargs)
        if inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {inference!r}")
        self.num_classes = int(num_classes)
        self.loss = loss
        self.ignore_index = int(ignore_index)
        self.inference = inference
        self.slide_crop = _pair(slide_crop)
        self.slide_stride = _pair(slide_stride)
        if min(self.slide_stride) < 1 or any(s > c for s, c in zip(self.slide_stride, self.slide_crop)):
            raise ValueError(f"slide_stride {self.slide_stride} must be in 1..slide_crop {self.slide_crop}")
        self.metric = ConfusionMatrix(self.num_classes, ignore_index=self.ignore_index)
        #: Writes prediction PNGs (and overlays) when the runner sets ``output_dir``; built from the datamodule.
        self.writer = None
        self.summary = ""

    # ------------------------------------------------------------------ inference
    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        """Normalised images -> raw head output."""
        return self.run_model(images)

    def _whole_logits(self, images: torch.Tensor) -> torch.Tensor:
        return upsample_logits(self(images).logits.float(), images.shape[-2:])

    def _slide_logits(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        ch, cw = min(self.slide_crop[0], h), min(self.slide_crop[1], w)
        sh, sw = min(self.slide_stride[0], ch), min(self.slide_stride[1], cw)
        rows = list(range(0, max(h - ch, 0) + 1, sh))
        cols = list(range(0, max(w - cw, 0) + 1, sw))
        if rows[-1] + ch < h:
            rows.append(h - ch)
        if cols[-1] + cw < w:
            cols.append(w - cw)
        logits = images.new_zeros((b, self.num_classes, h, w), dtype=torch.float32)
        count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
        for y in rows:
            for x in cols:
                window = images[:, :, y : y + ch, x : x + cw]
                logits[:, :, y : y + ch, x : x + cw] += self._whole_logits(window)
                count[:, :, y : y + ch, x : x + cw] += 1
        return logits / count

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per image: the predicted class map ``[H0, W0]`` (long) at its ORIGINAL size."""
        images = self.normalize(batch["images"])
        logits = self._slide_logits(images) if self.inference == "slide" else self._whole_logits(images)
        preds = []
        for i in range(logits.shape[0]):
            vh, vw = (int(v) for v in batch["valid_sizes"][i])
            oh, ow = (int(v) for v in batch["orig_sizes"][i])
            image_logits = upsample_logits(logits[i : i + 1, :, :vh, :vw], (oh, ow))
            preds.append(image_logits[0].argmax(0))
        return preds

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def graph_loss_names(self) -> tuple[str, ...]:
        aux = getattr(getattr(self.model, "head", None), "aux", None) is not None
        return ("loss", "seg_loss", "aux_loss") if aux else ("loss", "seg_loss")

    def graph_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return batch["images"], batch["masks"]

    def graph_losses(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.loss(self(self.normalize(images)), masks.long())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.cuda_graph:
            return self.captured_training_step(batch)
        losses = self.graph_losses(batch["images"], batch["masks"])
        bs = batch["images"].shape[0]
        self.log_training({f"train/{k}": losses[k] for k in self.graph_loss_names}, bs)
        return self.guard_loss(losses["loss"])

    def on_validation_epoch_start(self) -> None:
        self.sync_state_from_rank_zero()
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "class_names", None)
        if names is not None and len(names) == self.num_classes:
            self.metric.class_names = list(names)
        self.metric.reset()
        self.writer = None
        if self.output_dir is not None:
            if dm is None or not hasattr(dm, "make_writer"):
                raise RuntimeError("writing predictions needs a segmentation datamodule (make_writer)")
            self.writer = dm.make_writer(Path(self.output_dir))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Evaluates the batch; returns its predicted class maps (original size) for callbacks
        (:class:`tasks.val_images.ValidationImages`)."""
        preds = self.predict_batch(batch)
        for i, pred in enumerate(preds):
            oh, ow = pred.shape
            self.metric.update(pred, batch["masks"][i, :oh, :ow])
        if self.writer is not None:
            self.writer.write([int(v) for v in batch["indices"]], [p.to(torch.uint8).cpu().numpy() for p in preds])
        return {"predictions": preds}

    def on_validation_epoch_end(self) -> None:
        metrics = self.metric.compute()
        self.last_metrics = metrics
        self.summary = format_iou_table(metrics)
        if self.trainer.is_global_zero:
            print("\n" + self.summary, flush=True)
        # Every rank holds the same reduced numbers, so no further reduction is needed.
        for key in ("mIoU", "aAcc", "mAcc"):
            self.log(f"val/{key}", float(metrics[key]), prog_bar=key == "mIoU", rank_zero_only=False)
        self.log_per_class(metrics["per_class"], ("IoU",))
