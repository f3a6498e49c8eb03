"""The typed contract between backbones, necks and heads.

Every stage that produces multiscale features exposes ``out_specs: dict[str, FeatureSpec]`` and returns
``dict[str, Tensor]`` with exactly those keys, finest level first. Keys are ``"p<level>"`` with
``level = log2(stride)``, so ``"p3"`` is the stride-8 map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["FeatureSpec", "check_features", "level_name", "level_of"]


@dataclass(frozen=True)
class FeatureSpec:
    """Channels and stride (input pixels per feature pixel) of one feature map."""

    channels: int
    stride: int

    def __post_init__(self) -> None:
        if self.channels <= 0:
            raise ValueError(f"FeatureSpec.channels must be positive, got {self.channels}")
        if self.stride <= 0 or self.stride & (self.stride - 1):
            raise ValueError(f"FeatureSpec.stride must be a positive power of two, got {self.stride}")

    @property
    def level(self) -> int:
        return int(math.log2(self.stride))


def level_name(level: int) -> str:
    """``3 -> "p3"``."""
    return f"p{level}"


def level_of(name: str) -> int:
    """``"p3" -> 3``; raises ``ValueError`` for names outside the contract."""
    if not (name.startswith("p") and name[1:].isdigit()):
        raise ValueError(f"feature name {name!r} is not of the form 'p<level>'")
    return int(name[1:])


def check_features(
    features: Mapping[str, torch.Tensor],
    specs: Mapping[str, FeatureSpec],
    image_hw: tuple[int, int] | None = None,
) -> None:
    """Raise ``ValueError`` if ``features`` break the contract described by ``specs``.

    Checks keys and their order, channel counts and, when ``image_hw`` is given, the spatial size
    ``ceil(H / stride) x ceil(W / stride)``.
    """
    if list(features) != list(specs):
        raise ValueError(f"feature keys {list(features)} differ from out_specs keys {list(specs)}")
    for name, spec in specs.items():
        x = features[name]
        if x.shape[1] != spec.channels:
            raise ValueError(f"{name}: {x.shape[1]} channels, out_specs says {spec.channels}")
        if image_hw is not None:
            want = (math.ceil(image_hw[0] / spec.stride), math.ceil(image_hw[1] / spec.stride))
            if tuple(x.shape[-2:]) != want:
                raise ValueError(f"{name}: spatial size {tuple(x.shape[-2:])}, expected {want}")
