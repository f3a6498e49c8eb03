"""Validation pictures for the loggers that take images: the ground truth beside the prediction.

At each validation while training, the first images of the first validation batch are drawn twice, ground truth on
the left and the model's prediction on the right (detection: boxes with class names, and scores for the
predictions; segmentation: colour overlays), and logged as ``val_images/<k>`` at the current step. Only rank zero
draws, from what the validation step already computed, so validation runs no extra forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch

from datasets.drawing import draw_detections, overlay_segmentation

from .loggers import image_sinks

__all__ = ["ValidationImages"]

#: White pixels between the ground-truth and the prediction picture.
GAP = 4


class ValidationImages(L.Callback):
    """Logs ``num_images`` validation pictures at each validation during ``fit`` (not in the sanity check, nor in
    the final evaluation) to every logger that takes images; does nothing when there is none (CSV only).

    Args:
        num_images: pictures per validation, from the first validation batch (so at most its batch size); 0: none.
        score_threshold: detections scoring below it are not drawn.
        max_size: pictures are scaled down so that their longer side is at most this many pixels.
    """

    def __init__(self, *, num_images: int = 4, score_threshold: float = 0.3, max_size: int = 640) -> None:
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if max_size < 16:
            raise ValueError(f"max_size must be >= 16, got {max_size}")
        self.num_images = int(num_images)
        self.score_threshold = float(score_threshold)
        self.max_size = int(max_size)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if (self.num_images == 0 or batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking
                or not trainer.is_global_zero or trainer.state.fn != "fit" or not isinstance(outputs, dict)):
            return
        sinks = image_sinks(trainer.loggers)
        names = pl_module.class_names()
        if not sinks or names is None:
            return
        if "detections" in outputs:
            pictures = self.detection_pictures(batch, outputs["detections"], names)
        elif "predictions" in outputs:
            pictures = self.segmentation_pictures(batch, outputs["predictions"], names)
        else:
            return
        for k, picture in enumerate(pictures):
            for sink in sinks:
                sink(f"val_images/{k}", picture, trainer.global_step)

    # ------------------------------------------------------------------ drawing
    def _fit(self, image: np.ndarray) -> float:
        """The factor that brings ``image``'s longer side down to :attr:`max_size` (1 when it is no longer)."""
        return min(1.0, self.max_size / max(image.shape[:2]))

    def detection_pictures(self, batch: dict[str, torch.Tensor], det: dict[str, torch.Tensor],
                           names: Sequence[str]) -> list[np.ndarray]:
        """Ground truth | prediction at the network input (padding cropped off), for the first images of ``batch``."""
        n = min(self.num_images, int(batch["images"].shape[0]))
        images = batch["images"][:n].permute(0, 2, 3, 1).cpu().numpy()
        valid = (batch["orig_sizes"][:n].double() * batch["scales"][:n].double().view(-1, 1)).ceil().long().tolist()
        gt_boxes, gt_labels = batch["boxes"][:n].cpu(), batch["labels"][:n].cpu()
        boxes, scores = det["input_boxes"][:n].float().cpu(), det["scores"][:n].float().cpu()
        labels, counts = det["labels"][:n].cpu(), det["num_detections"][:n].cpu()
        out = []
        for i in range(n):
            h, w = (min(int(v), s) for v, s in zip(valid[i], images[i].shape[:2]))
            image = images[i, :h, :w]
            f = self._fit(image)
            if f < 1.0:
                image = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
            keep_gt = gt_labels[i] >= 0
            truth = draw_detections(image, (gt_boxes[i][keep_gt] * f).tolist(), None, gt_labels[i][keep_gt].tolist(),
                                    names)
            m = int(counts[i])
            keep = (scores[i, :m] >= self.score_threshold) & (labels[i, :m] >= 0)
            predicted = draw_detections(image, (boxes[i, :m][keep] * f).tolist(), scores[i, :m][keep].tolist(),
                                        labels[i, :m][keep].tolist(), names)
            out.append(_side_by_side(truth, predicted))
        return out

    def segmentation_pictures(self, batch: dict[str, torch.Tensor], preds: Sequence[torch.Tensor],
                              names: Sequence[str]) -> list[np.ndarray]:
        """Ground truth | prediction overlays at the original image size (scaled down to :attr:`max_size`)."""
        n = min(self.num_images, len(preds))
        out = []
        for i in range(n):
            vh, vw = (int(v) for v in batch["valid_sizes"][i])
            oh, ow = (int(v) for v in batch["orig_sizes"][i])
            image = batch["images"][i, :, :vh, :vw].permute(1, 2, 0).cpu().numpy()
            truth = batch["masks"][i, :oh, :ow].cpu().numpy()
            predicted = preds[i].to(torch.uint8).cpu().numpy()
            f = min(1.0, self.max_size / max(oh, ow))
            size = (max(1, round(ow * f)), max(1, round(oh * f)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if (vw, vh) != size else image
            truth = cv2.resize(truth, size, interpolation=cv2.INTER_NEAREST) if (ow, oh) != size else truth
            predicted = cv2.resize(predicted, size, interpolation=cv2.INTER_NEAREST) if (ow, oh) != size else predicted
            out.append(_side_by_side(overlay_segmentation(np.ascontiguousarray(image), truth, names),
                                     overlay_segmentation(np.ascontiguousarray(image), predicted, names)))
        return out


def _side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    h, w = left.shape[:2]
    out = np.full((h, 2 * w + GAP, 3), 255, dtype=np.uint8)
    out[:, :w] = left
    out[:, w + GAP :] = right
    return out
