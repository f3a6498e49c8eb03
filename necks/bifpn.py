"""BiFPN: weighted bidirectional feature pyramid (EfficientDet, Tan et al. 2020).

The topology is data: a tuple of :class:`FusionNode` s, each naming its output level and the indices of
the maps it fuses in a running list (the input levels first, then each node's output in order). One
layer class interprets any such list, so FPN-, PANet- or BiFPN-style graphs differ only in their nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backbones.contract import FeatureSpec, level_name, level_of
from layers.conv import (
    PAD_MODES,
    ActLayer,
    ConvNorm,
    MaxPoolDown,
    NormLayer,
    SeparableConv2d,
    default_norm_layer,
)

__all__ = ["FUSION_KINDS", "BiFPN", "BiFPNLayer", "FusionNode", "bifpn_topology"]

#: "fast": ReLU weights normalised by their sum; "softmax": softmax-normalised weights; "sum": plain sum.
FUSION_KINDS = ("fast", "softmax", "sum")


@dataclass(frozen=True)
class FusionNode:
    """One output map at ``level``, fusing the running-list entries ``inputs``."""

    level: int
    inputs: tuple[int, ...]


def bifpn_topology(min_level: int, max_level: int) -> tuple[FusionNode, ...]:
    """The BiFPN graph: a top-down pass then a bottom-up pass with same-level skip connections.

    Running-list ids ``0 .. L-1`` are the input levels ``min_level .. max_level``. The top-down node at
    level ``l`` fuses the latest map of ``l`` with the latest of ``l + 1``; the bottom-up node fuses every
    map of ``l`` so far with the latest of ``l - 1``. Outputs are the last map of each level.
    """
    if max_level <= min_level:
        raise ValueError(f"BiFPN needs at least two levels, got {min_level}..{max_level}")
    ids: dict[int, list[int]] = {lv: [i] for i, lv in enumerate(range(min_level, max_level + 1))}
    nodes: list[FusionNode] = []
    next_id = len(ids)
    for lv in range(max_level - 1, min_level - 1, -1):
        nodes.append(FusionNode(lv, (ids[lv][-1], ids[lv + 1][-1])))
        ids[lv].append(next_id)
        next_id += 1
    for lv in range(min_level + 1, max_level + 1):
        nodes.append(FusionNode(lv, (*ids[lv], ids[lv - 1][-1])))
        ids[lv].append(next_id)
        next_id += 1
    return tuple(nodes)


class _Resample(nn.Module):
    """Bring one input map to a node's channels and level: optional 1x1 conv+norm, then pool or upsample."""

    def __init__(
        self, in_channels: int, out_channels: int, level_diff: int, *, pad_mode: str, norm_layer: NormLayer
    ) -> None:
        super().__init__()
        self.project = ConvNorm(in_channels, out_channels, norm_layer=norm_layer) if in_channels != out_channels else None
        self.down = nn.Sequential(*[MaxPoolDown(pad_mode) for _ in range(max(level_diff, 0))])
        self.upsample = level_diff < 0

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.project is not None:
            x = self.project(x)
        x = self.down(x)
        if self.upsample:
            x = F.interpolate(x, size=size, mode="nearest")
        return x


class _FusionNodeModule(nn.Module):
    def __init__(
        self,
        node: FusionNode,
        in_channels: Sequence[int],
        in_levels: Sequence[int],
        *,
        channels: int,
        fusion: str,
        pad_mode: str,
        norm_layer: NormLayer,
        act_layer: ActLayer,
        separable: bool,
    ) -> None:
        super().__init__()
        self.inputs = node.inputs
        self.resample = nn.ModuleList(
            _Resample(c, channels, node.level - lv, pad_mode=pad_mode, norm_layer=norm_layer)
            for c, lv in zip(in_channels, in_levels)
        )
        # The output size is the size of an input already at the node's level.
        self.size_ref = list(in_levels).index(node.level)
        self.fusion = fusion
        self.weight = nn.Parameter(torch.ones(len(node.inputs))) if fusion != "sum" else None
        self.act = act_layer()
        if separable:
            self.conv = SeparableConv2d(channels, channels, norm_layer=norm_layer)
        else:
            self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm_layer(channels))

    def normalized_weights(self) -> torch.Tensor:
        """The fusion weights as used: ReLU then divided by their sum + 1e-4 ("fast"), or softmax."""
        if self.fusion == "fast":
            w = F.relu(self.weight)
            return w / (w.sum() + 1e-4)
        return torch.softmax(self.weight, dim=0)

    def forward(self, maps: list[torch.Tensor], weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """``weights``: this node's normalised fusion weights (0-d tensors), when the layer has computed them
        for all its nodes at once; otherwise the node computes them."""
        size = maps[self.inputs[self.size_ref]].shape[-2:]
        xs = [rs(maps[i], size) for rs, i in zip(self.resample, self.inputs)]
        if self.weight is None:
            out = xs[0]
            for x in xs[1:]:
                out = out + x
        else:
            if weights is None:
                weights = self.normalized_weights().unbind()
            if weights[0].dtype != xs[0].dtype:
                weights = [w.to(xs[0].dtype) for w in weights]
            out = xs[0] * weights[0]
            for x, w in zip(xs[1:], weights[1:]):
                out = torch.addcmul(out, x, w)  # out + x * w in one kernel
        return self.conv(self.act(out))


class BiFPNLayer(nn.Module):
    """One BiFPN cell: interprets a topology (list of :class:`FusionNode`) over ``in_specs``."""

    def __init__(
        self,
        in_specs: Mapping[str, FeatureSpec],
        *,
        channels: int,
        nodes: Sequence[FusionNode],
        fusion: str = "fast",
        pad_mode: str = "native",
        norm_layer: NormLayer = default_norm_layer,
        act_layer: ActLayer = nn.SiLU,
        separable: bool = True,
    ) -> None:
        super().__init__()
        if fusion not in FUSION_KINDS:
            raise ValueError(f"fusion must be one of {FUSION_KINDS}, got {fusion!r}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        levels = [level_of(k) for k in in_specs]
        chans = [s.channels for s in in_specs.values()]
        self.num_inputs = len(levels)
        self.nodes = nn.ModuleList()
        for node in nodes:
            if any(i >= len(levels) for i in node.inputs):
                raise ValueError(f"node {node} refers to a map that does not exist yet")
            in_levels = [levels[i] for i in node.inputs]
            if node.level not in in_levels:
                raise ValueError(f"node {node} has no input at its own level")
            self.nodes.append(
                _FusionNodeModule(
                    node,
                    [chans[i] for i in node.inputs],
                    in_levels,
                    channels=channels,
                    fusion=fusion,
                    pad_mode=pad_mode,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    separable=separable,
                )
            )
            levels.append(node.level)
            chans.append(channels)
        # "fast" weights of all nodes with the same number of inputs are normalised together (one small tensor
        # per group instead of a handful of tiny operations per node, in the forward and the backward pass).
        self.fusion = fusion
        groups: dict[int, list[int]] = {}
        for i, node in enumerate(nodes):
            groups.setdefault(len(node.inputs), []).append(i)
        self.weight_groups = list(groups.values())
        # The output of each level is its last map.
        out_levels = sorted(set(levels))
        self.out_ids = [max(i for i, lv in enumerate(levels) if lv == level) for level in out_levels]
        self.out_specs = {level_name(lv): FeatureSpec(channels=channels, stride=2**lv) for lv in out_levels}
        for i, name in zip(self.out_ids, self.out_specs):
            if i < self.num_inputs:
                raise ValueError(f"level {name} is never produced by a fusion node")

    def node_weights(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...] | None]:
        """Each node's normalised "fast" fusion weights as 0-d tensors of ``dtype`` (``None`` for other kinds:
        nodes then compute their own)."""
        if self.fusion != "fast":
            return [None] * len(self.nodes)
        out: list[tuple[torch.Tensor, ...] | None] = [None] * len(self.nodes)
        for group in self.weight_groups:
            w = F.relu(torch.stack([self.nodes[i].weight for i in group]))  # [nodes, inputs]
            w = (w / (w.sum(1, keepdim=True) + 1e-4)).to(dtype)
            scalars = w.reshape(-1).unbind()
            n = w.shape[1]
            for j, i in enumerate(group):
                out[i] = scalars[j * n:(j + 1) * n]
        return out

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        maps = list(features.values())
        for node, weights in zip(self.nodes, self.node_weights(maps[0].dtype)):
            maps.append(node(maps, weights))
        return {name: maps[i] for name, i in zip(self.out_specs, self.out_ids)}


class BiFPN(nn.Module):
    """Stack of BiFPN cells over a backbone's maps, adding coarser levels where the backbone stops.

    Levels ``min_level .. max_level`` are produced. Backbone maps inside that range are used directly;
    each missing coarser level is made from the previous one by a 1x1 conv+norm (only when the channel
    count differs) and a stride-2 max pool.

    Args:
        in_specs: the backbone's ``out_specs``; levels below ``min_level`` are ignored.
        channels: BiFPN width.
        num_repeats: number of stacked cells.
        fusion: one of :data:`FUSION_KINDS`.
        min_level, max_level: pyramid range (3..7 for EfficientDet D0-D7, 3..8 for D7x; 2.. for segmentation).
        pad_mode: "native" or "same" (TensorFlow-compatible pooling).
        topology: function ``(min_level, max_level) -> nodes``; defaults to :func:`bifpn_topology`.
    """

    def __init__(
        self,
        in_specs: Mapping[str, FeatureSpec],
        *,
        channels: int,
        num_repeats: int,
        fusion: str = "fast",
        min_level: int = 3,
        max_level: int = 7,
        pad_mode: str = "native",
        norm_layer: NormLayer = default_norm_layer,
        act_layer: ActLayer = nn.SiLU,
        separable: bool = True,
        topology: Callable[[int, int], Sequence[FusionNode]] = bifpn_topology,
    ) -> None:
        super().__init__()
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        used = {k: s for k, s in in_specs.items() if min_level <= level_of(k) <= max_level}
        if not used:
            raise ValueError(f"no input level within {min_level}..{max_level}: got {list(in_specs)}")
        in_levels = [level_of(k) for k in used]
        if in_levels != list(range(min_level, in_levels[-1] + 1)):
            raise ValueError(f"input levels must be contiguous from p{min_level}: got {list(used)}")
        self.in_names = list(used)
        self.extra = nn.ModuleList()
        specs = dict(used)
        prev = specs[self.in_names[-1]]
        for lv in range(in_levels[-1] + 1, max_level + 1):
            proj = (
                ConvNorm(prev.channels, channels, norm_layer=norm_layer) if prev.channels != channels else nn.Identity()
            )
            self.extra.append(nn.Sequential(proj, MaxPoolDown(pad_mode)))
            prev = FeatureSpec(channels=channels, stride=2**lv)
            specs[level_name(lv)] = prev
        nodes = tuple(topology(min_level, max_level))
        self.cells = nn.ModuleList()
        for _ in range(num_repeats):
            cell = BiFPNLayer(
                specs,
                channels=channels,
                nodes=nodes,
                fusion=fusion,
                pad_mode=pad_mode,
                norm_layer=norm_layer,
                act_layer=act_layer,
                separable=separable,
            )
            self.cells.append(cell)
            specs = cell.out_specs
        self.out_specs: dict[str, FeatureSpec] = dict(specs)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        maps = {name: features[name] for name in self.in_names}
        x = maps[self.in_names[-1]]
        start = len(self.in_names)
        for i, extra in enumerate(self.extra):
            x = extra(x)
            maps[level_name(level_of(self.in_names[0]) + start + i)] = x
        for cell in self.cells:
            maps = cell(maps)
        return maps
