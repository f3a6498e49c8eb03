"""Assembled models (plain ``nn.Module`` s) and the EfficientDet compound-scaling table."""

from .detector import Detector, efficientdet
from .scaling import EFFICIENTDET_SCALES, EfficientDetScale, get_scale, scale_for_backbone

__all__ = ["Detector", "efficientdet", "EFFICIENTDET_SCALES", "EfficientDetScale", "get_scale", "scale_for_backbone"]
