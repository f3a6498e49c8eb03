"""A tiny segmenter memorises a few synthetic street scenes: mIoU > 0.8 on the images it trained on."""

from __future__ import annotations

import functools

import pytest
import torch

from backbones import TimmBackbone
from datasets import CityscapesSegmentation, build_segmentation_eval_transform, collate_segmentation
from evaluation.miou import ConfusionMatrix
from heads import SegmentationHead, SegmentationLoss, upsample_logits
from models import DenseModel
from necks import BiFPN
from tasks.base import IMAGENET_MEAN, IMAGENET_STD


@pytest.mark.slow
def test_tiny_segmenter_overfits_four_images(tmp_path):
    from datasets import synthetic_cityscapes_root

    torch.manual_seed(0)
    root = synthetic_cityscapes_root(tmp_path, num_train=4, num_val=1, height=64, width=128, seed=0)
    ds = CityscapesSegmentation(root=root, split="train", transform=build_segmentation_eval_transform())
    batch = collate_segmentation([ds[i] for i in range(4)], size_divisor=32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    images = (batch["images"].float() - mean) / std
    masks = batch["masks"].long()
    assert images.shape[-2:] == masks.shape[-2:] == (64, 128)

    bn = functools.partial(torch.nn.BatchNorm2d, eps=1e-3, momentum=0.1)
    model = DenseModel(
        backbone=TimmBackbone(name="b0", levels=(2, 3, 4, 5), drop_path_rate=0.0),
        neck=functools.partial(BiFPN, channels=32, num_repeats=1, min_level=2, max_level=5, norm_layer=bn),
        head=functools.partial(SegmentationHead, num_classes=ds.num_classes, depth=1, dropout=0.0, norm_layer=bn),
    )
    loss_fn = SegmentationLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    first = None
    for _ in range(STEPS):
        losses = loss_fn(model(images), masks)
        first = first if first is not None else float(losses["loss"].detach())
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert float(losses["loss"]) < 0.2 * first

    with torch.no_grad():  # batch statistics (train mode): the same 4 images the model memorised
        pred = upsample_logits(model(images).logits, masks.shape[-2:]).argmax(1)
    metric = ConfusionMatrix(ds.num_classes, class_names=ds.class_names)
    metric.update(pred, masks)
    result = metric.compute()
    present = [name for name, v in result["IoU"].items() if v is not None]
    assert len(present) >= 6, present
    assert result["mIoU"] > 0.8, result


STEPS = 120
