"""Compose every config group option and instantiate what it describes."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tasks.config import CONFIG_DIR, compose


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_defaults_compose_to_d0_coco():
    cfg = compose("train")
    assert cfg.scale == "d0" and cfg.model.image_size == 512
    assert cfg.neck.channels == 64 and cfg.neck.num_repeats == 3 and cfg.head.depth == 3
    assert cfg.head.num_classes == cfg.data.num_classes == 90
    assert cfg.head.num_anchors == 9
    assert cfg.task.module.loss.num_classes == 90


@pytest.mark.parametrize("backbone", _options("backbone"))
def test_every_backbone_option_composes(backbone):
    overrides = [f"backbone={backbone}"]
    if backbone == "timm":
        overrides.append("backbone.name=resnet18")
    cfg = compose("train", overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["neck"]["channels"] > 0
    if backbone.removeprefix("tf_").startswith("b"):
        i = int(backbone[-1])
        row = "d7x" if i == 7 else f"d{i}"
        assert cfg.scale == row
        assert cfg.padding == ("same" if backbone.startswith("tf_") else "native")
    if backbone.startswith("lite"):  # EfficientDet-LiteN: its own row, timm's TensorFlow-padded Lite backbone
        assert cfg.scale == backbone and cfg.padding == "same"
        assert resolved["model"]["backbone"]["name"] == f"tf_efficientnet_{backbone}"
        assert resolved["model"]["neck"]["act_layer"]["name"] == "relu6"


def test_b3_selects_d3_row_and_overrides_win():
    cfg = compose("train", ["backbone=b3"])
    assert (cfg.model.image_size, cfg.neck.channels, cfg.neck.num_repeats, cfg.head.depth) == (896, 160, 6, 4)
    cfg = compose("train", ["backbone=b3", "model.image_size=640", "neck.num_repeats=2"])
    assert cfg.model.image_size == 640 and cfg.data.image_size == 640 and cfg.neck.num_repeats == 2
    cfg = compose("train", ["backbone=b6", "scale=d7"])
    assert cfg.model.image_size == 1536 and cfg.anchors.anchor_scale == 5.0


@pytest.mark.parametrize("group", ["neck", "trainer", "task", "optim", "experiment"])
def test_every_group_option_composes(group):
    for option in _options(group):
        cfg = compose("train", [f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_every_dataset_of_a_task_composes(task):
    options = _options(f"dataset/{task}")
    assert "default" in options and "synthetic" in options
    for option in options:
        overrides = [f"task={task}", f"data={option}"]
        if option in ("folder", "yolo"):  # yolo reads them from the dataset's YAML unless given
            overrides.append("data.class_names=[background,road,car]")
        cfg = compose("train", overrides)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["head"]["num_classes"] == resolved["data"]["num_classes"]
        assert resolved["head"]["_target_"].endswith("SegmentationHead" if task == "segmentation" else "EfficientDetHead")


def test_every_data_choice_names_a_dataset_config():
    for option in _options("data"):
        assert any((CONFIG_DIR / "dataset" / task / f"{option}.yaml").is_file() for task in ("detection", "segmentation"))


def test_segmentation_selects_p2_and_synthetic_cityscapes():
    cfg = compose("train", ["task=segmentation", "data=synthetic", "backbone=b2"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["backbone"]["levels"] == [2, 3, 4, 5]
    assert resolved["neck"]["min_level"] == 2 and resolved["neck"]["max_level"] == 7
    assert resolved["data"]["format"] == "cityscapes" and resolved["data"]["synthetic"]["num_train"] > 0
    assert resolved["data"]["size_divisor"] == 128 and resolved["data"]["num_classes"] == 19
    assert resolved["checkpoint"]["monitor"] == "val/mIoU"
    det = OmegaConf.to_container(compose("train", ["data=synthetic"]), resolve=True)
    assert det["backbone"]["levels"] == [3, 4, 5] and det["neck"]["min_level"] == 3
    assert det["data"]["label_mode"] == "contiguous"


def test_decoded_cache_reaches_the_segmentation_datasets(tmp_path):
    """data.decoded_cache from the command line: the loader's samples are kept decoded in that folder."""
    cfg = compose("train", ["task=segmentation", "data=synthetic", f"cache_dir={tmp_path}", "data.num_workers=0",
                            f"data.decoded_cache={tmp_path / 'decoded'}", "data.synthetic.num_train=2",
                            "data.synthetic.num_val=1", "data.batch_size=2"])
    assert compose("train", ["task=segmentation"]).data.decoded_cache is None  # off by default
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_dataset.decoded_cache == dm.val_dataset.decoded_cache == tmp_path / "decoded"
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[0] == 2
    assert len(list((tmp_path / "decoded").rglob("*.npy"))) == 4  # image and mask of both training frames


def test_wrong_dataset_for_the_task_is_a_config_error():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="dataset/detection/cityscapes"):
        compose("train", ["data=cityscapes"])


def test_model_instantiates_to_plain_module():
    cfg = compose("train", ["neck.channels=16", "neck.num_repeats=1", "data.num_classes=3"])
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module)
    assert not any("lightning" in type(m).__module__ for m in model.modules())
    out = model.eval()(torch.randn(1, 3, 128, 128))
    assert out.cls_logits["p3"].shape[1] == 9 * 3


def test_task_pieces_instantiate():
    cfg = compose("train", ["data.num_classes=3"])
    module_cfg = cfg.task.module
    for key in ("anchors", "assigner", "loss", "postprocess"):
        obj = instantiate(module_cfg[key])
        assert obj is not None
    opt = instantiate(module_cfg.optimizer)
    assert isinstance(opt, functools.partial)


def test_trainer_config_is_lightning_trainer_kwargs():
    import inspect

    import lightning as L

    cfg = compose("train")
    allowed = set(inspect.signature(L.Trainer.__init__).parameters)
    assert set(cfg.trainer) <= allowed


def test_unknown_key_is_an_error():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("train", ["trainer.max_epoch=3"])
