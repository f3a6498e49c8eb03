"""Assembled models (plain ``nn.Module`` s) and the EfficientDet compound-scaling table."""

from .detector import DenseModel, Detector, Segmenter, efficientdet
from .scaling import EFFICIENTDET_SCALES, EfficientDetScale, get_scale, scale_for_backbone

__all__ = ["EFFICIENTDET_SCALES", "DenseModel", "Detector", "EfficientDetScale", "Segmenter", "efficientdet", "get_scale", "scale_for_backbone"]
