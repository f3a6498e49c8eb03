"""The feature contract, checked for every backbone variant."""

from __future__ import annotations

import math

import pytest
import torch

from backbones import EFFICIENTNET_VARIANTS, FeatureSpec, TimmBackbone, check_features, level_of
from backbones.timm_backbone import WeightsMismatchError, load_backbone_weights

# Spatial size not a multiple of 32 on purpose: outputs must be ceil(H / stride).
H, W = 70, 100


@pytest.mark.parametrize("variant", sorted(EFFICIENTNET_VARIANTS))
def test_efficientnet_contract(variant):
    bb = TimmBackbone(name=variant, levels=(2, 3, 4, 5))
    specs = bb.out_specs
    assert list(specs) == ["p2", "p3", "p4", "p5"]
    assert [s.stride for s in specs.values()] == [4, 8, 16, 32]
    assert all(level_of(k) == s.level for k, s in specs.items())
    x = torch.randn(1, 3, H, W, requires_grad=True)
    out = bb(x)
    check_features(out, specs, (H, W))
    for name, f in out.items():
        assert f.shape[-2:] == (math.ceil(H / specs[name].stride), math.ceil(W / specs[name].stride))
        assert torch.isfinite(f).all()
    sum(f.mean() for f in out.values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # The classifier head is not part of a features-only backbone.
    assert not any("classifier" in k for k in bb.state_dict())


def test_other_timm_model_by_name():
    bb = TimmBackbone(name="resnet18", levels=(3, 4, 5))
    assert {k: s.stride for k, s in bb.out_specs.items()} == {"p3": 8, "p4": 16, "p5": 32}
    assert [s.channels for s in bb.out_specs.values()] == [128, 256, 512]
    check_features(bb(torch.randn(1, 3, 64, 64)), bb.out_specs, (64, 64))


def test_unavailable_level_is_an_error():
    with pytest.raises(ValueError, match="levels"):
        TimmBackbone(name="b0", levels=(3, 6))


def test_feature_spec_validation():
    assert FeatureSpec(channels=8, stride=16).level == 4
    with pytest.raises(ValueError):
        FeatureSpec(channels=8, stride=12)
    with pytest.raises(ValueError):
        FeatureSpec(channels=0, stride=8)


def test_check_features_catches_wrong_channels():
    bb = TimmBackbone(name="b0")
    out = bb(torch.randn(1, 3, 64, 64))
    bad = dict(bb.out_specs)
    bad["p3"] = FeatureSpec(channels=41, stride=8)
    with pytest.raises(ValueError, match="p3"):
        check_features(out, bad)


def test_local_weights_roundtrip_and_mismatch(tmp_path):
    src = TimmBackbone(name="b0")
    path = tmp_path / "b0.pth"
    # A full-model file: features plus classifier keys, which are skipped.
    state = dict(src.body.state_dict())
    state["classifier.weight"] = torch.zeros(10, 1280)
    torch.save(state, path)
    dst = TimmBackbone(name="b0", weights=path)
    for k, v in src.body.state_dict().items():
        assert torch.equal(v, dst.body.state_dict()[k]), k

    wrong = tmp_path / "b1.pth"
    torch.save(TimmBackbone(name="b1").body.state_dict(), wrong)
    with pytest.raises(WeightsMismatchError, match="b1.pth") as err:
        load_backbone_weights(dst, wrong)
    assert "unexpected" in str(err.value) or "shape" in str(err.value)

    partial = tmp_path / "partial.pth"
    torch.save({k: v for i, (k, v) in enumerate(state.items()) if i % 2}, partial)
    with pytest.raises(WeightsMismatchError, match="missing"):
        TimmBackbone(name="b0", weights=partial)


OTHER_TIMM_FAMILIES = [
    "efficientnetv2_rw_t",  # EfficientNetV2
    "tf_efficientnet_lite0",  # EfficientNet-Lite
    "mobilenetv3_large_100",  # MobileNetV3
    "resnet18",  # ResNet
    "convnext_nano",  # ConvNeXt (no stride-2 feature: P2..P5)
]


@pytest.mark.parametrize("name", OTHER_TIMM_FAMILIES)
def test_timm_family_contract_and_config_selection(name):
    bb = TimmBackbone(name=name, levels=(2, 3, 4, 5))
    assert [s.stride for s in bb.out_specs.values()] == [4, 8, 16, 32]
    # A multiple of the coarsest stride (ConvNeXt's unpadded 4x4 stem floors other sizes).
    x = torch.randn(1, 3, 96, 128, requires_grad=True)
    out = bb(x)
    check_features(out, bb.out_specs, (96, 128))
    assert all(torch.isfinite(f).all() for f in out.values())
    sum(f.mean() for f in out.values()).backward()
    assert x.grad is not None

    # Selected from config: backbone=timm backbone.name=<name> builds a detector on it.
    from hydra.utils import instantiate

    from tasks.config import compose

    cfg = compose("train", ["backbone=timm", f"backbone.name={name}", "neck.channels=16", "neck.num_repeats=1"])
    model = instantiate(cfg.model).eval()
    assert model.backbone.model_name == name
    det = model(torch.randn(1, 3, 128, 128))
    assert set(det.cls_logits) == {"p3", "p4", "p5", "p6", "p7"}


@pytest.mark.parametrize(("name", "stages", "first_trainable"), [
    ("b0", 3, "body.blocks.3."),
    ("resnet18", 2, "body.layer2."),
    ("convnext_nano", 1, "body.stages_1."),
])
def test_frozen_stages(name, stages, first_trainable):
    bb = TimmBackbone(name=name, frozen_stages=stages)
    params = list(bb.named_parameters())
    frozen = [n for n, p in params if not p.requires_grad]
    trainable = [n for n, p in params if p.requires_grad]
    assert frozen and trainable[0].startswith(first_trainable)
    assert all(i < len(frozen) for i, (n, p) in enumerate(params) if not p.requires_grad)  # a prefix
    bb.train()
    norms = [m for m in bb.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    frozen_norms = [m for m in norms if not m.weight.requires_grad]
    assert all(not m.training for m in frozen_norms)
    assert frozen_norms or name.startswith("convnext")  # ConvNeXt has LayerNorm only
    assert all(m.training for m in norms if m.weight.requires_grad)
    with pytest.raises(ValueError, match="frozen_stages"):
        TimmBackbone(name=name, frozen_stages=9)


def test_activations_out_of_place_same_values_fewer_operations():
    """timm's in-place SiLUs are switched off: same features and gradients, and no copy of each activation's
    input for autograd (one operation less per activation in a training step)."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    from backbones.timm_backbone import _input_saving_activations, out_of_place_activations

    torch.manual_seed(0)
    ours = TimmBackbone(name="b0", levels=(3, 4, 5))
    acts = [m for m in ours.modules() if isinstance(m, _input_saving_activations())]
    assert acts and not any(m.inplace for m in acts)
    timm_like = copy.deepcopy(ours)
    for m in timm_like.modules():
        if isinstance(m, _input_saving_activations()):
            m.inplace = True
    assert out_of_place_activations(copy.deepcopy(timm_like)) == len(acts)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 3, 64, 64)
    results = []
    for model in (ours, timm_like):
        model.train()
        with Ops() as ops:
            feats = model(x)
            sum(f.square().mean() for f in feats.values()).backward()
        results.append((feats, [p.grad for p in model.parameters()], ops.names))
    (f_ours, g_ours, ops_ours), (f_timm, g_timm, ops_timm) = results
    for k in f_ours:
        torch.testing.assert_close(f_ours[k], f_timm[k], rtol=0, atol=0)
    for a, b in zip(g_ours, g_timm):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ops_timm.count("clone") == len(acts)  # the in-place model copies every activation's input
    assert ops_ours.count("clone") == 0
    assert len(ops_ours) == len(ops_timm) - len(acts)
