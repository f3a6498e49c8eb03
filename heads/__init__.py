"""Heads and the small objects the tasks compose around them.

Modules (``nn.Module``) compute tensors only: :class:`EfficientDetHead` returns raw per-level logits and
box deltas, :class:`SegmentationHead` per-pixel logits. Anchors, matching, box coding, the losses and
post-processing are separate plain objects.
"""

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .efficientdet import DetectionOutput, EfficientDetHead, HeadNet, flatten_levels
from .losses import DetectionLoss, huber_loss, sigmoid_focal_loss
from .matcher import IoUMatcher, TargetAssigner, box_iou
from .postprocess import DetectionPostProcess
from .seg_loss import SegmentationLoss, ohem_cross_entropy
from .segmentation import SegmentationHead, SegmentationOutput, upsample_logits

__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "DetectionLoss",
    "DetectionOutput",
    "DetectionPostProcess",
    "EfficientDetHead",
    "HeadNet",
    "IoUMatcher",
    "SegmentationHead",
    "SegmentationLoss",
    "SegmentationOutput",
    "TargetAssigner",
    "box_iou",
    "flatten_levels",
    "huber_loss",
    "ohem_cross_entropy",
    "sigmoid_focal_loss",
    "upsample_logits",
]
