"""Heads and the small objects a detection task composes around them.

Modules (``nn.Module``) compute tensors only: :class:`EfficientDetHead` returns raw per-level logits and
box deltas. Anchors, matching, box coding, the loss and post-processing are separate plain objects.
"""

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .efficientdet import DetectionOutput, EfficientDetHead, HeadNet, flatten_levels
from .losses import DetectionLoss, huber_loss, sigmoid_focal_loss
from .matcher import IoUMatcher, TargetAssigner, box_iou
from .postprocess import DetectionPostProcess

__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "DetectionOutput",
    "EfficientDetHead",
    "HeadNet",
    "flatten_levels",
    "DetectionLoss",
    "huber_loss",
    "sigmoid_focal_loss",
    "IoUMatcher",
    "TargetAssigner",
    "box_iou",
    "DetectionPostProcess",
]
