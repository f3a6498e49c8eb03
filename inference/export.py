"""Export a checkpoint's model to ONNX (and TorchScript) and check the exported graph against PyTorch.

The exported graph takes ``images``: float ``[B, 3, H, W]`` RGB in 0..255 (already resized/padded to the
export size) and normalises inside. Outputs:

- detection with ``postprocess=True``: ``boxes [B, D, 4]`` (x1, y1, x2, y2 in input pixels), ``scores [B, D]``,
  ``labels [B, D]`` (-1 for empty rows), ``num_detections [B]`` -- decode, clipping and class-wise NMS inside
  the graph;
- detection without: ``cls_logits [B, A, C]``, ``box_deltas [B, A, 4]`` and the constant ``anchors [A, 4]``;
- segmentation: ``logits [B, C, H, W]`` at input size and ``labels [B, H, W]`` (argmax).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.files import atomic_path

__all__ = ["ExportModule", "check_onnx", "export_onnx", "export_torchscript"]

log = logging.getLogger(__name__)


class ExportModule(nn.Module):
    """Wraps a task's model (and, for detection, anchors + post-processing) as a graph with tensor outputs."""

    def __init__(self, task, *, postprocess: bool = True) -> None:
        super().__init__()
        from tasks.segmentation import SegmentationTask

        # The plain pieces, not the LightningModule (tracing must not touch Trainer-bound attributes).
        self.model = task.model
        self.register_buffer("mean", task.mean.detach().clone(), persistent=False)
        self.register_buffer("std", task.std.detach().clone(), persistent=False)
        self.kind = "segmentation" if isinstance(task, SegmentationTask) else "detection"
        self.num_classes = int(task.num_classes)
        self.anchors = getattr(task, "anchors", None)
        self.post = getattr(task, "postprocess", None)
        self.postprocess = bool(postprocess)

    @property
    def output_names(self) -> list[str]:
        if self.kind == "segmentation":
            return ["logits", "labels"]
        if self.postprocess:
            return ["boxes", "scores", "labels", "num_detections"]
        return ["cls_logits", "box_deltas", "anchors"]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from heads import flatten_levels, upsample_logits

        x = (images.float() - self.mean) / self.std
        out = self.model(x)
        if self.kind == "segmentation":
            logits = upsample_logits(out.logits.float(), x.shape[-2:])
            return logits, logits.argmax(1)
        cls = flatten_levels(out.cls_logits, self.num_classes)
        box = flatten_levels(out.box_deltas, 4)
        anchors = self.anchors({k: tuple(v.shape[-2:]) for k, v in out.cls_logits.items()}, device=cls.device)
        if not self.postprocess:
            return cls, box, anchors
        det = self.post(cls, box, anchors, tuple(x.shape[-2:]))
        return det["boxes"], det["scores"], det["labels"], det["num_detections"]


def _example(batch_size: int, image_size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, 3, *image_size), generator=g).float()


def export_onnx(
    module: ExportModule, path: str | Path, *, image_size: tuple[int, int], batch_size: int = 1,
    dynamic_batch: bool = False, opset: int = 17,
) -> Path:
    """Write ``module`` as ONNX to ``path`` (through a temporary file: a failed export leaves nothing)."""
    path = Path(path)
    module = module.eval()
    example = _example(batch_size, image_size)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {"images": {0: "batch"}}
        for name in module.output_names:
            if name != "anchors":
                dynamic_axes[name] = {0: "batch"}
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(
            module, (example,), str(tmp), input_names=["images"], output_names=module.output_names,
            dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
        )
    return path


def export_torchscript(module: ExportModule, path: str | Path, *, image_size: tuple[int, int], batch_size: int = 1) -> Path:
    """Trace ``module`` to TorchScript (fixed input size) and save it to ``path``."""
    path = Path(path)
    module = module.eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, (_example(batch_size, image_size),), strict=False, check_trace=False)
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp))
    return path


def _compare(names: list[str], ours: tuple[torch.Tensor, ...], theirs: list[np.ndarray], kind: str) -> dict[str, Any]:
    diffs: dict[str, Any] = {}
    ref = {n: t.detach().cpu().numpy() for n, t in zip(names, ours)}
    got = dict(zip(names, theirs))
    if kind == "detection" and "num_detections" in ref:
        # Detections are matched per image by label and box (tied scores may come out in another order). A
        # detection scoring within 1e-5 of the image's last kept score may be swapped with another equally scored
        # one at the max_detections cut: those are counted as cut ties, not as mismatches.
        diffs["num_detections_equal"] = bool(np.array_equal(ref["num_detections"], got["num_detections"]))
        matched = total = ties = 0
        box_diff = score_diff = 0.0
        for b in range(ref["boxes"].shape[0]):
            n_ref, n_got = int(ref["num_detections"][b]), int(got["num_detections"][b])
            got_boxes, got_labels, got_scores = got["boxes"][b, :n_got], got["labels"][b, :n_got], got["scores"][b, :n_got]
            cut = float(ref["scores"][b, n_ref - 1]) if n_ref else 0.0
            for i in range(n_ref):
                same = np.flatnonzero(got_labels == ref["labels"][b, i])
                d = np.abs(got_boxes[same] - ref["boxes"][b, i]).max(axis=1) if same.size else np.array([np.inf])
                if d.min() <= 0.5:
                    total += 1
                    matched += 1
                    j = same[int(d.argmin())]
                    box_diff = max(box_diff, float(d.min()))
                    score_diff = max(score_diff, float(abs(got_scores[j] - ref["scores"][b, i])))
                elif abs(float(ref["scores"][b, i]) - cut) <= 1e-5 and n_got == n_ref:
                    ties += 1
                else:
                    total += 1
        diffs["matched_fraction"] = matched / total if total else 1.0
        diffs["cut_ties"] = ties
        diffs["boxes"] = box_diff
        diffs["scores"] = score_diff
        return diffs
    for name in names:
        if name == "labels":
            diffs["labels_agree"] = float((ref[name] == got[name]).mean())
        else:
            diffs[name] = float(np.abs(ref[name].astype(np.float64) - got[name]).max(initial=0.0))
    return diffs


def check_onnx(module: ExportModule, path: str | Path, *, image_size: tuple[int, int], batch_size: int = 1,
               seed: int = 1) -> dict[str, Any]:
    """Run the ONNX file in onnxruntime and PyTorch on the same input; max abs differences per output."""
    import onnxruntime as ort

    example = _example(batch_size, image_size, seed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    theirs = session.run(None, {"images": example.numpy()})
    ort_ms = (time.perf_counter() - start) * 1000
    with torch.no_grad():
        ours = module.eval()(example)
    result = _compare(module.output_names, ours, theirs, module.kind)
    result["onnxruntime_ms"] = round(ort_ms, 1)
    return result


def check_torchscript(module: ExportModule, path: str | Path, *, image_size: tuple[int, int], batch_size: int = 1,
                      seed: int = 1) -> dict[str, Any]:
    example = _example(batch_size, image_size, seed)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        theirs = [t.numpy() for t in loaded(example)]
        ours = module.eval()(example)
    return _compare(module.output_names, ours, theirs, module.kind)
