"""BiFPN: topology, fusion kinds, padding modes and the feature contract."""

from __future__ import annotations

import math

import pytest
import torch

from backbones import FeatureSpec, check_features
from layers.conv import MaxPoolDown
from necks import BiFPN, FusionNode, bifpn_topology

SPECS = {
    "p3": FeatureSpec(channels=40, stride=8),
    "p4": FeatureSpec(channels=112, stride=16),
    "p5": FeatureSpec(channels=320, stride=32),
}


def _features(specs, h, w, batch=2):
    return {k: torch.randn(batch, s.channels, math.ceil(h / s.stride), math.ceil(w / s.stride)) for k, s in specs.items()}


def test_topology_p3_p7_matches_paper_graph():
    nodes = bifpn_topology(3, 7)
    # ids 0..4 are P3..P7 inputs; top-down nodes 5..8 (P6, P5, P4, P3), then bottom-up 9..12 (P4..P7).
    assert nodes == (
        FusionNode(6, (3, 4)),
        FusionNode(5, (2, 5)),
        FusionNode(4, (1, 6)),
        FusionNode(3, (0, 7)),
        FusionNode(4, (1, 7, 8)),
        FusionNode(5, (2, 6, 9)),
        FusionNode(6, (3, 5, 10)),
        FusionNode(7, (4, 11)),
    )


@pytest.mark.parametrize("fusion", ["fast", "softmax", "sum"])
@pytest.mark.parametrize("pad_mode", ["native", "same"])
def test_bifpn_contract(fusion, pad_mode):
    neck = BiFPN(SPECS, channels=32, num_repeats=2, fusion=fusion, pad_mode=pad_mode)
    assert list(neck.out_specs) == ["p3", "p4", "p5", "p6", "p7"]
    assert all(s.channels == 32 and s.stride == 2 ** (i + 3) for i, s in enumerate(neck.out_specs.values()))
    h, w = 200, 136  # not multiples of 128: sizes must still follow ceil(H / stride)
    feats = _features(SPECS, h, w)
    out = neck(feats)
    check_features(out, neck.out_specs, (h, w))
    loss = sum(o.square().mean() for o in out.values())
    loss.backward()
    assert all(torch.isfinite(o).all() for o in out.values())
    has_weights = any(n.endswith(".weight") and p.ndim == 1 and p.numel() in (2, 3) for n, p in neck.named_parameters())
    assert has_weights == (fusion != "sum")


def test_p2_and_p8_levels():
    specs = {"p2": FeatureSpec(channels=24, stride=4), **SPECS}
    neck = BiFPN(specs, channels=16, num_repeats=1, min_level=2, max_level=8)
    assert list(neck.out_specs) == [f"p{i}" for i in range(2, 9)]
    check_features(neck(_features(specs, 256, 256)), neck.out_specs, (256, 256))


def test_invalid_fusion_rejected_once_in_init():
    with pytest.raises(ValueError, match="fusion"):
        BiFPN(SPECS, channels=8, num_repeats=1, fusion="mean")


def test_same_padding_pool_is_asymmetric():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    native = MaxPoolDown("native")(x)
    same = MaxPoolDown("same")(x)
    # native pads one on every side: windows start at -1; "same" pads only bottom/right: windows start at 0.
    assert native.flatten().tolist() == [5.0, 7.0, 13.0, 15.0]
    assert same.flatten().tolist() == [10.0, 11.0, 14.0, 15.0]
    odd = torch.randn(1, 1, 5, 7)
    assert MaxPoolDown("same")(odd).shape[-2:] == (3, 4) == MaxPoolDown("native")(odd).shape[-2:]


def test_fast_fusion_weights_are_normalised():
    neck = BiFPN(SPECS, channels=8, num_repeats=1, fusion="fast")
    node = neck.cells[0].nodes[0]
    with torch.no_grad():
        node.weight.copy_(torch.tensor([3.0, -1.0]))  # relu -> (3, 0): output uses only the first input
    a, b = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)
    maps = [None, None, None, a, b]
    node.conv = torch.nn.Identity()
    node.act = torch.nn.Identity()
    out = node(maps)
    assert torch.allclose(out, a * 3.0 / (3.0 + 1e-4), atol=1e-6)


@pytest.mark.parametrize("fusion", ["fast", "softmax", "sum"])
def test_layer_normalises_all_node_weights_as_each_node_does(fusion):
    """The layer normalises the "fast" weights of all its nodes together; that must equal each node's own."""
    torch.manual_seed(0)
    neck = BiFPN(SPECS, channels=8, num_repeats=2, fusion=fusion)
    cell = neck.cells[0]
    with torch.no_grad():
        for node in cell.nodes:
            if node.weight is not None:
                node.weight.uniform_(-0.5, 2.0)  # some negative: ReLU zeroes them
    batched = cell.node_weights(torch.float32)
    if fusion != "fast":
        assert batched == [None] * len(cell.nodes)
        return
    assert {len(cell.nodes[i].inputs) for g in cell.weight_groups for i in g} == {2, 3}
    for node, weights in zip(cell.nodes, batched):
        own = node.normalized_weights()
        assert len(weights) == len(node.inputs)
        torch.testing.assert_close(torch.stack(weights), own, rtol=0, atol=1e-7)
    # The neck's output equals running each node with its own weights, and gradients reach every weight.
    feats = {k: torch.randn(2, s.channels, 64 // s.stride, 64 // s.stride) for k, s in SPECS.items()}
    out = neck(feats)
    maps = {name: feats[name] for name in neck.in_names}
    x = maps[neck.in_names[-1]]
    for i, extra in enumerate(neck.extra):
        x = extra(x)
        maps[f"p{int(neck.in_names[0][1:]) + len(neck.in_names) + i}"] = x
    for c in neck.cells:
        running = list(maps.values())
        for node in c.nodes:
            running.append(node(running))
        maps = {name: running[i] for name, i in zip(c.out_specs, c.out_ids)}
    for k in out:
        torch.testing.assert_close(out[k], maps[k], rtol=1e-5, atol=1e-5)
    # (not a plain sum: the sum of a BatchNorm's output in training does not depend on its input)
    sum((v * torch.randn_like(v)).sum() for v in out.values()).backward()
    assert all(n.weight.grad is not None and n.weight.grad.abs().sum() > 0 for c in neck.cells for n in c.nodes)
