"""Checks of the values users set on the command line, made before anything runs or is written, so a bad value is one
line naming the setting (``ConfigError``) instead of a traceback from deep inside a run."""

from __future__ import annotations

import importlib.util
import numbers
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.sizes import image_hw, stride_error

__all__ = ["LOGGER_NAMES", "ConfigError", "check_export_config", "check_input_size", "check_loggers",
           "check_predict_config", "check_run_config"]

#: What the ``logger`` setting of a training run picks from (one name or a list).
LOGGER_NAMES = ("csv", "tensorboard", "wandb")


class ConfigError(ValueError):
    """A setting has a value that cannot work."""


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=False)
    except OmegaConfBaseException as err:  # an interpolation that cannot resolve, e.g. an unknown scale name
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None


def _int(cfg: DictConfig, key: str, *, minimum: int, optional: bool = False, what: str = "") -> int | None:
    value = _get(cfg, key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key} must be {bound}{what}, got {value!r}")
    return int(value)


def _size(cfg: DictConfig, key: str, *, optional: bool = False):
    """An input size: one positive side (a square) or ``[H, W]``; returned as given (``None`` when optional and
    unset)."""
    value = _get(cfg, key)
    if value is None and optional:
        return None
    try:
        image_hw(value, name=key)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return value


def _number(cfg: DictConfig, key: str, *, low: float, high: float | None = None, low_open: bool = False) -> None:
    value = _get(cfg, key)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        span = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ConfigError(f"{key} must be a number {span}, got {value!r}")


def check_input_size(cfg: DictConfig) -> None:
    """``model.image_size`` (and ``data.image_size`` where set apart from it): one side or ``[H, W]``; for detection
    each side a multiple of the finest stride."""
    task = _get(cfg, "task.name")
    keys = ["model.image_size"]
    if task == "detection" and _get(cfg, "data.image_size") not in (None, _get(cfg, "model.image_size")):
        keys.append("data.image_size")  # set apart from the model's: the data is what the network sees
    for key in keys:
        size = _size(cfg, key)
        if task == "detection":
            # Coarser maps may round up (EfficientDet-Lite0's 320 px is 2.5 P7 cells): anchors then spread over the
            # input's extent, which the finest map gives exactly only when the input is a multiple of its stride.
            min_level = _get(cfg, "neck.min_level")
            if isinstance(min_level, numbers.Integral):
                why = f", the stride of the finest feature level (P{min_level}): anchors and feature maps would disagree"
                error = stride_error(size, 2 ** int(min_level), name=key, why=why)
                if error:
                    raise ConfigError(error)


def check_run_config(cfg: DictConfig) -> None:
    """The values of a training or evaluation config: sizes, batch sizes, workers, learning rate, steps, scale."""
    _get(cfg, "scale")
    check_input_size(cfg)
    _int(cfg, "data.batch_size", minimum=1)
    _int(cfg, "data.val_batch_size", minimum=1, optional=True)
    _int(cfg, "data.num_workers", minimum=0)
    if _get(cfg, "task.module.optimizer.lr") is not None:
        _number(cfg, "task.module.optimizer.lr", low=0.0, low_open=True)
    if _get(cfg, "logger") is not None:
        check_loggers(_get(cfg, "logger"))
    if _get(cfg, "val_images") is not None:
        _int(cfg, "val_images.num", minimum=0, what=" (0: no validation images)")
        _number(cfg, "val_images.score_threshold", low=0.0, high=1.0)
    if _get(cfg, "trainer") is not None:
        _int(cfg, "trainer.max_steps", minimum=-1, optional=True, what=" (-1: no limit)")
        _int(cfg, "trainer.max_epochs", minimum=-1, optional=True, what=" (-1: no limit)")


def check_loggers(value: Any) -> list[str]:
    """The ``logger`` setting (a name or a list of names of :data:`LOGGER_NAMES`) as a list without repeats; a
    :class:`ConfigError` for an unknown name, an empty list, or ``wandb`` without the wandb package."""
    items = [value] if isinstance(value, str) else list(value) if OmegaConf.is_list(value) or isinstance(
        value, (list, tuple)) else None
    if not items or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"logger must be one of {', '.join(LOGGER_NAMES)} or a list of them, e.g. "
                          f"logger=[csv,tensorboard], got {value!r}")
    unknown = [v for v in items if v not in LOGGER_NAMES]
    if unknown:
        raise ConfigError(f"logger: unknown logger {unknown[0]!r}; choose from {', '.join(LOGGER_NAMES)} "
                          "(one name or a list, e.g. logger=[csv,tensorboard])")
    if "wandb" in items and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb needs the wandb package: pip install wandb (or use logger=tensorboard)")
    return list(dict.fromkeys(items))


def check_predict_config(cfg: DictConfig) -> None:
    """The values of ``tools/predict.py``'s config."""
    _int(cfg, "batch_size", minimum=1)
    _number(cfg, "score_threshold", low=0.0, high=1.0)
    _size(cfg, "image_size", optional=True)


def check_export_config(cfg: DictConfig) -> None:
    """The values of ``tools/export.py``'s config: batch size, input size and the ONNX opset."""
    import torch.onnx

    _int(cfg, "batch_size", minimum=1)
    _size(cfg, "image_size", optional=True)
    newest = getattr(torch.onnx, "_constants", None)
    high = getattr(newest, "ONNX_MAX_OPSET", None) if newest is not None else None
    opset = _int(cfg, "opset", minimum=1)
    low = 13  # the oldest opset the export is checked with (docs/data.md)
    if opset < low or (high is not None and opset > high):
        raise ConfigError(f"opset must be between {low} and {high or 'the newest torch.onnx knows'}, got {opset}")
