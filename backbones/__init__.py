"""Backbones: multiscale feature extractors behind the :class:`FeatureSpec` contract."""

from .contract import FeatureSpec, check_features, level_name, level_of
from .timm_backbone import EFFICIENTNET_VARIANTS, TimmBackbone, WeightsMismatchError, load_backbone_weights

__all__ = [
    "FeatureSpec",
    "check_features",
    "level_name",
    "level_of",
    "TimmBackbone",
    "EFFICIENTNET_VARIANTS",
    "WeightsMismatchError",
    "load_backbone_weights",
]
