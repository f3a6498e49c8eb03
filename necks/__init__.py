"""Necks: fuse a backbone's multiscale maps into a pyramid of equal width."""

from layers.conv import PAD_MODES, ConvNorm, MaxPoolDown, SeparableConv2d, default_norm_layer

from .bifpn import FUSION_KINDS, BiFPN, BiFPNLayer, FusionNode, bifpn_topology

__all__ = [
    "FUSION_KINDS",
    "PAD_MODES",
    "BiFPN",
    "BiFPNLayer",
    "ConvNorm",
    "FusionNode",
    "MaxPoolDown",
    "SeparableConv2d",
    "bifpn_topology",
    "default_norm_layer",
]
