"""A tiny detector memorises a few synthetic images: its top boxes reach IoU > 0.5 with the truth."""

from __future__ import annotations

import functools

import pytest
import torch

from backbones import TimmBackbone
from datasets import CocoDetection, build_eval_transform, collate_detection
from heads import (
    AnchorGenerator,
    BoxCoder,
    DetectionLoss,
    DetectionPostProcess,
    EfficientDetHead,
    IoUMatcher,
    TargetAssigner,
    box_iou,
    flatten_levels,
)
from models import Detector
from necks import BiFPN
from tasks.detection import IMAGENET_MEAN, IMAGENET_STD


@pytest.mark.slow
def test_tiny_model_overfits_four_images(synthetic_coco):
    torch.manual_seed(0)
    ds = CocoDetection(
        image_dir=synthetic_coco / "train2017",
        ann_file=synthetic_coco / "annotations" / "instances_train2017.json",
        transform=build_eval_transform(image_size=128),
    )
    samples = [ds[i] for i in range(len(ds)) if len(ds[i]["labels"]) > 0][:4]
    assert len(samples) == 4
    batch = collate_detection(samples)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    images = (batch["images"].float() - mean) / std

    model = Detector(
        backbone=TimmBackbone(name="b0", drop_path_rate=0.0),
        neck=functools.partial(BiFPN, channels=32, num_repeats=1),
        head=functools.partial(EfficientDetHead, num_classes=ds.num_classes, depth=2),
    )
    anchors_gen = AnchorGenerator()
    coder = BoxCoder()
    assigner = TargetAssigner(matcher=IoUMatcher(threshold=0.5), box_coder=coder)
    loss_fn = DetectionLoss(num_classes=ds.num_classes)
    post = DetectionPostProcess(box_coder=coder, max_detections=20)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)

    def run():
        out = model(images)
        cls = flatten_levels(out.cls_logits, ds.num_classes)
        box = flatten_levels(out.box_deltas, 4)
        anchors = anchors_gen({k: tuple(v.shape[-2:]) for k, v in out.cls_logits.items()})
        return cls, box, anchors

    model.train()
    first = None
    for step in range(150):
        cls, box, anchors = run()
        targets = assigner(anchors, batch["boxes"], batch["labels"])
        losses = loss_fn(cls, box, *targets)
        first = first if first is not None else losses["loss"].item()
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert float(losses["loss"]) < 0.2 * first

    with torch.no_grad():  # batch statistics (train mode): the same 4 images the model memorised
        cls, box, anchors = run()
        det = post(cls, box, anchors, (128, 128))
    for b in range(4):
        valid = batch["labels"][b] >= 0
        gt_boxes, gt_labels = batch["boxes"][b][valid], batch["labels"][b][valid]
        for g in range(len(gt_labels)):
            same_class = det["labels"][b] == gt_labels[g]
            ious = box_iou(gt_boxes[g : g + 1], det["boxes"][b])[0]
            best = float((ious * same_class).max())
            assert best > 0.5, f"image {b} object {g}: best IoU {best:.2f}"

    # bf16 autocast keeps the trained model's detections: every confident float32 detection is found again
    # with its class, IoU > 0.9 and a score within 0.05 (the tolerance docs/benchmarks.md states).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cls16, box16, _ = run()
    det16 = post(cls16, box16, anchors, (128, 128))
    confident = 0
    for b in range(4):
        for i in torch.nonzero(det["scores"][b] > 0.3).squeeze(1).tolist():
            confident += 1
            ious = box_iou(det["boxes"][b, i : i + 1], det16["boxes"][b])[0]
            close = (ious > 0.9) & (det16["labels"][b] == det["labels"][b, i])
            close &= (det16["scores"][b] - det["scores"][b, i]).abs() < 0.05
            assert close.any(), f"image {b}: fp32 detection {i} (score {float(det['scores'][b, i]):.3f}) lost in bf16"
    assert confident >= 4
