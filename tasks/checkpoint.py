"""Self-describing checkpoints: the resolved run config (``effdense_config``) and class names
(``effdense_class_names``) travel inside every checkpoint, so evaluation, prediction, export and fine-tuning
need only ``ckpt=PATH``.

How a checkpoint's config combines with the composed one (``merge_checkpoint_config``):

- the model's structure (``scale``, ``padding``, ``backbone``, ``neck``, ``head``, ``model``, ``anchors``,
  ``box_coder``) comes from the checkpoint; for evaluation/prediction also ``task`` (loss and post-processing
  settings) and, unless the command line chooses a dataset (``data=``, ``data_root=``, ``cache_dir=``), the
  dataset it was trained on (dotted ``data.*`` overrides apply to it);
- for fine-tuning (``mode="finetune"``) the class count follows the *new* data (``${data.num_classes}``) and
  the training recipe (``task``) is the composed one;
- dotted command-line overrides of those keys (``task.module.postprocess.iou_threshold=0.6``) apply on top;
  ``model.image_size=...`` also sets the stored dataset's input size, so a model evaluates at another size;
- a group choice that contradicts the checkpoint (``task=segmentation`` for a detector, ``backbone=b3`` for a
  B0 model) is an error rather than a silent swap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "STRUCTURE_KEYS",
    "CheckpointError",
    "apply_overrides",
    "merge_checkpoint_config",
    "read_checkpoint",
    "stored_normalization",
    "trained_normalization",
    "without_backbone_init",
    "without_retired",
]

log = logging.getLogger(__name__)

#: Top-level config keys that define the model's structure.
STRUCTURE_KEYS = ("scale", "padding", "backbone", "neck", "head", "model", "anchors", "box_coder")
#: Config paths holding the class count (made to follow the new data when fine-tuning).
CLASS_COUNT_KEYS = ("head.num_classes", "task.module.num_classes", "task.module.loss.num_classes")
_DATA_KEYS = ("data", "data_root", "cache_dir", "dataset")
_MODEL_GROUPS = ("task", "backbone", "neck", "head", "scale", "padding")
#: Options that checkpoints of earlier versions may store and this version no longer has: dropped when read.
RETIRED_OPTIONS = ("task.module.fused_weight_casts",)
#: Option values this version no longer has, with what replaces them when a stored config names them.
RETIRED_VALUES = {("task.module.postprocess.nms_impl", "dense"): "auto"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or holds weights of another model."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (tensors and plain data only: ``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]  # torch's weights-only messages run to several lines
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: {first})") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: has no 'state_dict' (not a checkpoint of this project)")
    return ckpt


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            continue
        key, value = item.split("=", 1)
        parsed.append((key.lstrip("+~"), value))
    return parsed


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], *, under: Sequence[str] | None = None) -> None:
    """Apply ``key=value`` overrides (values parsed as YAML) to ``cfg`` in place; with ``under``, only dotted
    keys below those top-level keys."""
    for key, value in _parse_overrides(overrides):
        if under is None or ("." in key and key.split(".")[0] in under):
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=True)


def _choice_of(cfg: DictConfig, group: str):
    if group == "task":
        return OmegaConf.select(cfg, "task.name")
    if group == "backbone":
        return OmegaConf.select(cfg, "backbone.name")
    if group in ("neck", "head"):
        return OmegaConf.select(cfg, f"{group}._target_")
    return OmegaConf.select(cfg, group)


def merge_checkpoint_config(
    cfg: DictConfig, ckpt_config: dict[str, Any] | None, overrides: Sequence[str] = (), *, mode: str = "eval",
    source: str | Path = "checkpoint",
) -> DictConfig:
    """The composed ``cfg`` with the model (and, for evaluation, task and data) of ``ckpt_config``; see the
    module docstring. ``overrides`` are the command line's ``key=value`` items. Returns ``cfg`` unchanged when
    the checkpoint carries no config."""
    if mode not in ("eval", "finetune"):
        raise ValueError(f"mode must be 'eval' or 'finetune', got {mode!r}")
    if not ckpt_config:
        return cfg
    parsed = _parse_overrides(overrides)
    ck = without_backbone_init(without_retired(OmegaConf.create(ckpt_config)))
    # Group choices on the command line must agree with the checkpoint.
    for key, _ in parsed:
        if key in _MODEL_GROUPS:
            ours, theirs = _choice_of(cfg, key), _choice_of(ck, key)
            if theirs is not None and ours != theirs:
                raise CheckpointError(
                    f"{source} holds a model with {key} {theirs!r}, but the command line asks for {key}={ours!r}: "
                    f"drop {key}= (the checkpoint defines the model) or use a checkpoint of that model"
                )
    _check_task(cfg, ck, parsed, mode=mode, source=source)
    taken = list(STRUCTURE_KEYS)
    if mode == "eval":
        taken.append("task")
        # A dataset choice (data=..., data_root=..., cache_dir=...) replaces the stored dataset; dotted data.*
        # overrides apply on top of it.
        if not any(key in _DATA_KEYS for key, _ in parsed) and "data" in ck:
            taken.append("data")
    merged = OmegaConf.to_container(cfg, resolve=False)
    for key in taken:
        if key in ck:
            value = ck[key]
            merged[key] = OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value
    if mode == "eval" and "task" in ck:
        stored_normalization(merged)
    elif mode == "finetune" and isinstance(merged.get("task"), dict):
        # The composed recipe, with the normalisation the weights were trained with unless it sets its own.
        module = merged["task"].get("module")
        if isinstance(module, dict) and module.get("mean") is None and module.get("std") is None:
            module["mean"], module["std"] = trained_normalization(ckpt_config)
    # A stored config is resolved: model.{backbone,neck,head} are copies of the top-level nodes. Point them back
    # at those nodes so overrides (and the class count when fine-tuning) reach the model.
    model = merged.get("model")
    if isinstance(model, dict):
        for sub in ("backbone", "neck", "head"):
            if sub in model and sub in merged and model[sub] == merged[sub]:
                model[sub] = "${" + sub + "}"
        # Likewise the data's input size, so model.image_size=... evaluates at another size than the training one.
        data, size = merged.get("data"), model.get("image_size")
        if "data" in taken and isinstance(data, dict) and size is not None and data.get("image_size") == size:
            data["image_size"] = "${model.image_size}"
    out = OmegaConf.create(merged)
    if mode == "finetune":
        for path in CLASS_COUNT_KEYS:
            if OmegaConf.select(out, path) is not None:
                OmegaConf.update(out, path, "${data.num_classes}", merge=False)
    if "data" in taken and any(key == "data.root" for key, _ in parsed) and OmegaConf.select(out, "data.synthetic"):
        # The stored dataset was generated; a folder named on the command line is read as real data, never filled.
        OmegaConf.update(out, "data.synthetic", None, merge=False)
    apply_overrides(out, overrides, under=taken)
    log.info("model config from %s (%s)", source, ", ".join(k for k in taken if k in ck))
    return out


def without_retired(ck: DictConfig) -> DictConfig:
    """A stored config with the options of earlier versions that this one dropped removed or replaced."""
    for path in RETIRED_OPTIONS:
        parent, _, key = path.rpartition(".")
        node = OmegaConf.select(ck, parent)
        if isinstance(node, DictConfig) and key in node:
            node.pop(key)
    for (path, old), new in RETIRED_VALUES.items():
        if OmegaConf.select(ck, path, throw_on_resolution_failure=False) == old:
            OmegaConf.update(ck, path, new, merge=False)
    return ck


def without_backbone_init(ck: DictConfig) -> DictConfig:
    """A stored config whose backbone is built without its initialisation (``weights``, ``pretrained``), at the top
    level and under ``model``: the checkpoint's own weights replace it, and the ImageNet file it names need not exist
    (nor a download be possible) where the checkpoint is used."""
    for path in ("backbone", "model.backbone"):
        node = OmegaConf.select(ck, path, throw_on_resolution_failure=False)
        if isinstance(node, DictConfig):
            if "weights" in node:
                node.weights = None
            if "pretrained" in node:
                node.pretrained = False
    return ck


def stored_normalization(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with its normalisation made explicit: checkpoints that do not name it (written before
    the backbone chose it) were trained with ImageNet's mean and std, whatever the backbone."""
    module = (config.get("task") or {}).get("module")
    if isinstance(module, dict):
        module.setdefault("mean", [0.485, 0.456, 0.406])
        module.setdefault("std", [0.229, 0.224, 0.225])
    return config


def trained_normalization(config: dict[str, Any]) -> tuple[list[float] | None, list[float] | None]:
    """``(mean, std)`` a checkpoint's model was trained with, from its config (see :func:`stored_normalization`);
    ``None`` where the config leaves it to the backbone."""
    module = dict(((config or {}).get("task") or {}).get("module") or {})
    module = stored_normalization({"task": {"module": module}})["task"]["module"]
    return module["mean"], module["std"]


def _check_task(cfg: DictConfig, ck: DictConfig, parsed: list[tuple[str, str]], *, mode: str, source) -> None:
    """A :class:`CheckpointError` when the checkpoint's task (detection, segmentation) is not the one the composed
    parts that will be used with it were made for: the training recipe when fine-tuning, a dataset chosen on the
    command line when evaluating."""
    ours, theirs = _choice_of(cfg, "task"), _choice_of(ck, "task")
    if theirs is None or ours == theirs:
        return
    if mode == "finetune":
        raise CheckpointError(f"{source} holds a {theirs} model, and this run trains {ours}: add task={theirs} (or "
                              f"initialise from a {ours} checkpoint)")
    chosen = [key for key, _ in parsed if key in ("data", "dataset")]
    if chosen:
        raise CheckpointError(f"{source} holds a {theirs} model, and {chosen[0]}= chose a {ours} dataset: add "
                              f"task={theirs}")
