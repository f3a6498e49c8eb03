"""Backbones: multiscale feature extractors behind the :class:`FeatureSpec` contract."""

from .contract import FeatureSpec, check_features, level_name, level_of
from .timm_backbone import EFFICIENTNET_VARIANTS, TimmBackbone, WeightsMismatchError, load_backbone_weights

__all__ = [
    "EFFICIENTNET_VARIANTS",
    "FeatureSpec",
    "TimmBackbone",
    "WeightsMismatchError",
    "check_features",
    "level_name",
    "level_of",
    "load_backbone_weights",
]
