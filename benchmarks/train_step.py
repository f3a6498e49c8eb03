"""This project's bare training step (forward, loss, backward, SGD step) and the random batches it trains on."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from inference.fast_paths import FastPaths, FlatDetector, compile_module

__all__ = ["loss_fields", "our_train_step", "random_masks", "random_targets", "sgd", "train_inputs", "working_copy"]


def working_copy(model: torch.nn.Module, paths: FastPaths, device: torch.device, *, train: bool) -> torch.nn.Module:
    """A copy of ``model`` on ``device`` in train or eval mode, channels-last when asked (norms not folded)."""
    model = copy.deepcopy(model).to(device).train(train)
    return model.to(memory_format=torch.channels_last) if paths.channels_last else model


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of both implementations' bare steps."""
    # The multi-tensor (foreach) implementation on every device, as on CUDA: a few operations per step, not a few
    # per parameter.
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=4e-5, foreach=True)


def random_targets(b: int, size: tuple[int, int], num_classes: int, *, per_image: int, device, seed: int):
    """``per_image`` random xyxy boxes (5-30 % of each side) and class indices for each of ``b`` images."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    xy = torch.rand(b, per_image, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = (torch.rand(b, per_image, 2, generator=g) * 0.25 + 0.05) * torch.tensor([w, h])
    boxes = torch.cat([xy, xy + wh], -1)
    labels = torch.randint(0, num_classes, (b, per_image), generator=g)
    return boxes.to(device), labels.to(device)


def random_masks(batch: int, size: tuple[int, int], num_classes: int, seed: int) -> torch.Tensor:
    """uint8 ``[batch, H, W]`` class maps: random classes, 5 % of the pixels 255 (ignored)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, num_classes, (batch, *size), dtype=torch.uint8, generator=g)
    return masks.masked_fill(torch.rand(batch, *size, generator=g) < 0.05, 255)


def train_inputs(task_name: str, images: torch.Tensor, train_batch: int, size: tuple[int, int], num_classes: int,
                 seed: int, boxes: int = 8) -> tuple[torch.Tensor, ...]:
    """One training batch of ``train_batch`` at ``size`` on the images' device: ``(images, boxes, labels)`` for
    detection (``boxes`` per image), ``(images, masks)`` for segmentation (random classes, 5 % of the pixels
    ignored, as a Cityscapes mask has unlabelled pixels)."""
    device = images.device
    if train_batch <= images.shape[0] and tuple(images.shape[-2:]) == tuple(size):
        x = images[:train_batch]
    else:
        x = torch.randn(train_batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(device)
    if task_name == "detection":
        return (x, *random_targets(train_batch, size, num_classes, per_image=boxes, device=device, seed=seed))
    return x, random_masks(train_batch, size, num_classes, seed).to(device)


def our_train_step(task, paths: FastPaths, device, x, *targets) -> Callable[[], None]:
    """This project's training step on ``x`` and its ``targets`` (detection: boxes, labels; segmentation: masks):
    forward, loss, backward, SGD step."""
    from inference.fast_paths import _anchors_for
    from tasks.detection import DetectionTask

    model = working_copy(task.model, paths, device, train=True)
    if paths.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    detection = isinstance(task, DetectionTask)
    net = FlatDetector(model, task.num_classes) if detection else model
    net = compile_module(net, paths, training=True)
    opt = sgd(model)
    if detection:
        anchors = _anchors_for(task, model, tuple(x.shape[-2:]), device)
        assigner, focal = task.assigner, task.loss

        def criterion(out, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
            cls_t, box_t, num_pos = assigner(anchors, gt_boxes, gt_labels)
            return focal(*out, cls_t, box_t, num_pos)["loss"]
    else:  # the task's loss (cross-entropy or OHEM, the auxiliary term) on the label-sized logits, as in training

        def criterion(out, masks: torch.Tensor) -> torch.Tensor:
            return task.loss(out, masks.long())["loss"]

    def loss(images: torch.Tensor, *gt: torch.Tensor) -> torch.Tensor:
        with paths.autocast(device):
            out = net(images)
        return criterion(out, *gt)

    def step() -> None:
        loss(x, *targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def loss_fields(task, device: torch.device) -> dict[str, str]:
    """Which focal-loss and matching implementations this project's training step uses on ``device`` (detection
    only)."""
    fields = {}
    backend = getattr(getattr(task, "loss", None), "focal_backend", None)
    if backend is not None:
        fields["focal_loss"] = backend(device)
    backend = getattr(getattr(getattr(task, "assigner", None), "matcher", None), "backend", None)
    if backend is not None:
        fields["matching"] = backend(device)
    return fields
