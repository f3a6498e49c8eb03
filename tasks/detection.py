"""The detection task: composes a plain detector module with anchors, target assignment, loss,
post-processing and COCO evaluation, and trains it with Lightning."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from heads import AnchorGenerator, DetectionLoss, DetectionPostProcess, TargetAssigner, flatten_levels

from .base import IMAGENET_MEAN, IMAGENET_STD, DenseTask

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DetectionTask"]

log = logging.getLogger(__name__)


class DetectionTask(DenseTask):
    """Trains and evaluates a detector that returns :class:`heads.DetectionOutput`.

    Batches are the dicts of :func:`datasets.collate_detection`: uint8 images are normalised on the device
    (so data workers move bytes, not floats).

    Args:
        model: ``images -> DetectionOutput`` (e.g. :class:`models.DenseModel` with an EfficientDet head).
        num_classes: number of foreground classes (contiguous labels ``0 .. num_classes-1``).
        anchors, assigner, loss, postprocess: the composed detection pieces.
        cuda_graph_max_boxes: with ``cuda_graph=True``, the box count every training batch is padded to (the
            captured step has fixed shapes); a batch with more objects in one image runs its step eagerly (slower,
            with a warning that names this setting).
        **kwargs: optimizer, schedule, memory format and normalisation (see :class:`tasks.base.DenseTask`).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        num_classes: int,
        anchors: AnchorGenerator,
        assigner: TargetAssigner,
        loss: DetectionLoss,
        postprocess: DetectionPostProcess,
        cuda_graph_max_boxes: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, **kwargs)
        if cuda_graph_max_boxes < 1:
            raise ValueError(f"cuda_graph_max_boxes must be >= 1, got {cuda_graph_max_boxes}")
        self.cuda_graph_max_boxes = int(cuda_graph_max_boxes)
        self.num_classes = num_classes
        self.anchors = anchors
        self.assigner = assigner
        self.loss = loss
        self.postprocess = postprocess
        #: Set before validation (see :meth:`attach_evaluator`): accumulates COCO-format predictions.
        self.evaluator = None
        self.category_ids: torch.Tensor | None = None

    # ------------------------------------------------------------------ forward pieces
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised images -> flat class logits ``[B, A, C]``, box deltas ``[B, A, 4]`` and anchors ``[A, 4]``."""
        out = self.run_model(images)
        cls = flatten_levels(out.cls_logits, self.num_classes)
        box = flatten_levels(out.box_deltas, 4)
        shapes = {k: tuple(v.shape[-2:]) for k, v in out.cls_logits.items()}
        anchors = self.anchors(shapes, device=cls.device)
        return cls, box, anchors

    def _losses(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], tuple]:
        images = self.normalize(batch["images"])
        cls, box, anchors = self(images)
        cls_t, box_t, num_pos = self.assigner(anchors, batch["boxes"], batch["labels"])
        losses = self.loss(cls, box, cls_t, box_t, num_pos)
        return losses, (cls, box, anchors, images.shape[-2:])

    # ------------------------------------------------------------------ Lightning hooks
    graph_loss_names = ("loss", "cls_loss", "box_loss")

    def graph_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """uint8 images, and boxes and labels padded to :attr:`cuda_graph_max_boxes` per image (labels -1; a batch
        with more is left as it is, and its step runs eagerly)."""
        boxes, labels = batch["boxes"], batch["labels"]
        count, limit = boxes.shape[1], self.cuda_graph_max_boxes
        if count < limit:
            boxes = torch.nn.functional.pad(boxes, (0, 0, 0, limit - count))
            labels = torch.nn.functional.pad(labels, (0, limit - count), value=-1)
        return batch["images"], boxes, labels

    def graph_conforms(self, inputs) -> bool:
        """Whether the boxes are padded to :attr:`cuda_graph_max_boxes` (a batch with more is not captured)."""
        return inputs[1].shape[1] == self.cuda_graph_max_boxes

    def graph_losses(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._losses({"images": images, "boxes": boxes, "labels": labels})[0]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.cuda_graph:
            return self.captured_training_step(batch)
        losses, _ = self._losses(batch)
        bs = batch["images"].shape[0]
        self.log_training({f"train/{k}": losses[k] for k in ("loss", "cls_loss", "box_loss")}, bs)
        return self.guard_loss(losses["loss"])

    def attach_evaluator(self, evaluator, category_ids: Sequence[int]) -> None:
        """Use ``evaluator`` (a :class:`evaluation.coco.CocoEvaluator`) for validation; ``category_ids[k]`` is
        the dataset category id of contiguous label ``k``."""
        self.evaluator = evaluator
        self.category_ids = torch.as_tensor(list(category_ids), dtype=torch.long)

    def on_validation_epoch_start(self) -> None:
        self.sync_state_from_rank_zero()
        if self.evaluator is None:
            dm = getattr(self.trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "make_evaluator"):
                raise RuntimeError("validation needs a COCO evaluator: call attach_evaluator() or use a datamodule")
            self.attach_evaluator(dm.make_evaluator(), dm.category_ids)
        self.evaluator.reset()

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Detections in ORIGINAL image pixels with dataset category ids (padding rows have label -1)."""
        images = self.normalize(batch["images"])
        cls, box, anchors = self(images)
        return self._detections(cls, box, anchors, images.shape[-2:], batch)

    def _detections(self, cls, box, anchors, hw, batch) -> dict[str, torch.Tensor]:
        scales = batch["scales"].to(cls.device, torch.float32).view(-1, 1, 1)
        # Clip to the part of the padded input that holds the image.
        valid_hw = batch["orig_sizes"].to(cls.device, torch.float32) * scales.view(-1, 1)
        det = self.postprocess(cls, box, anchors, valid_hw)
        boxes = det["boxes"] / scales
        labels = det["labels"]
        if self.category_ids is None:  # no dataset attached (prediction): labels are the ids
            cat_ids = labels
        else:
            cat_ids = self.category_ids.to(labels.device)[labels.clamp(min=0)]
            cat_ids = torch.where(labels >= 0, cat_ids, torch.full_like(cat_ids, -1))
        return {"boxes": boxes, "scores": det["scores"], "category_ids": cat_ids, "labels": labels,
                "num_detections": det["num_detections"], "input_boxes": det["boxes"]}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Evaluates the batch; returns its detections (``input_boxes`` in network-input pixels) for callbacks
        (:class:`tasks.val_images.ValidationImages`)."""
        losses, (cls, box, anchors, hw) = self._losses(batch)
        bs = batch["images"].shape[0]
        self.log("val/loss", losses["loss"], batch_size=bs, sync_dist=True)
        det = self._detections(cls, box, anchors, hw, batch)
        self.evaluator.update(
            image_ids=batch["image_ids"].cpu(),
            boxes=det["boxes"].float().cpu(),
            scores=det["scores"].float().cpu(),
            category_ids=det["category_ids"].cpu(),
            num_detections=det["num_detections"].cpu(),
        )
        return {"detections": det}

    def on_validation_epoch_end(self) -> None:
        metrics = dict(self.evaluator.compute())
        metrics.setdefault("per_class", self.evaluator.per_class)
        self.last_metrics = metrics
        if self.trainer.is_global_zero:
            print("\n" + self.evaluator.summary + "\n\n" + self.evaluator.per_class_table, flush=True)
        for k, v in metrics.items():
            if isinstance(v, numbers.Real):  # Every rank holds the same gathered numbers: no reduction is needed.
                self.log(f"val/{k}", float(v), prog_bar=k in ("AP", "AP50"), rank_zero_only=False)
        self.log_per_class(metrics["per_class"], ("AP", "AP50"))

    def write_eval_outputs(self, run_dir, *, data=None) -> None:
        super().write_eval_outputs(run_dir, data=data)
        self.evaluator.write_predictions(Path(run_dir) / "predictions.json")
