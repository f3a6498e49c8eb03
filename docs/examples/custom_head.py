"""A custom head on an EfficientNet-B3 backbone and a BiFPN, written against the feature contract.

Run it: ``python docs/examples/custom_head.py`` (CPU, a few seconds). The test suite runs it too.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

import torch
import torch.nn.functional as F
from torch import nn

from backbones import FeatureSpec, TimmBackbone
from models import DenseModel
from necks import BiFPN


class CenterHeatmapHead(nn.Module):
    """A CenterNet-style head: one heatmap per class and a box size at the finest level it is given.

    Every channel count comes from ``in_specs`` (the contract), so the head works on any backbone or neck.
    """

    def __init__(self, in_specs: Mapping[str, FeatureSpec], *, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.level, spec = min(in_specs.items(), key=lambda item: item[1].stride)
        self.stride = spec.stride
        self.trunk = nn.Sequential(nn.Conv2d(spec.channels, width, 3, padding=1), nn.ReLU(inplace=True))
        self.heatmap = nn.Conv2d(width, num_classes, 1)
        self.size = nn.Conv2d(width, 2, 1)
        nn.init.constant_(self.heatmap.bias, -2.19)  # prior probability 0.1

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.trunk(features[self.level])
        return {"heatmap": self.heatmap(x), "size": self.size(x)}


def main() -> dict[str, object]:
    torch.manual_seed(0)
    # 1. A backbone by name; its out_specs say what it returns.
    backbone = TimmBackbone(name="b3", levels=(3, 4, 5))
    print("backbone:", backbone.out_specs)

    # 2. A BiFPN on any backbone: it reads the backbone's out_specs.
    neck = BiFPN(backbone.out_specs, channels=96, num_repeats=2, min_level=3, max_level=6)
    print("neck:", neck.out_specs)

    # 3. The custom head, composed with the same plain-module container the built-in tasks use.
    model = DenseModel(backbone=backbone, neck=neck, head=CenterHeatmapHead(neck.out_specs, num_classes=3))

    # 4. Train a step with a toy target, then predict.
    images = torch.randn(2, 3, 256, 256)
    target = torch.zeros(2, 3, 256 // model.head.stride, 256 // model.head.stride)
    target[:, 1, 10:12, 20:22] = 1.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    out = model(images)
    loss = F.binary_cross_entropy_with_logits(out["heatmap"], target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(images)
    print("heatmap:", tuple(out["heatmap"].shape), "size:", tuple(out["size"].shape), "loss:", float(loss.detach()))
    return {"specs": neck.out_specs, "heatmap": out["heatmap"], "size": out["size"], "loss": float(loss.detach())}


if __name__ == "__main__":
    main()
