"""Train and evaluate from a composed config. ``tools/train.py`` and ``tools/eval.py`` are thin wrappers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from backbones.timm_backbone import state_dict_mismatches

from .callbacks import EMA

__all__ = ["build_model", "build_task", "train", "evaluate", "load_checkpoint_weights", "CheckpointError"]

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or holds weights of another model."""


def build_model(cfg: DictConfig) -> torch.nn.Module:
    return instantiate(cfg.model)


def build_task(cfg: DictConfig, model: torch.nn.Module | None = None) -> L.LightningModule:
    model = build_model(cfg) if model is None else model
    task = instantiate(cfg.task.module, model=model)
    task.run_config = OmegaConf.to_container(cfg, resolve=True)
    return task


def _callbacks(cfg: DictConfig, ckpt_dir: Path) -> list[L.Callback]:
    monitor = cfg.checkpoint.monitor
    callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename=f"best-{{epoch:03d}}-{{{monitor}:.4f}}",
            monitor=monitor,
            mode=cfg.checkpoint.mode,
            save_top_k=cfg.checkpoint.save_top_k,
            save_last=True,
            auto_insert_metric_name=False,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.ema.enabled:
        callbacks.append(EMA(decay=cfg.ema.decay, warmup=cfg.ema.warmup))
    return callbacks


def _write_run_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "config.yaml")


def _resolve_resume(ckpt_path: str | None, ckpt_dir: Path) -> str | None:
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        last = ckpt_dir / "last.ckpt"
        if not last.is_file():
            log.warning("ckpt_path=last but %s does not exist: starting a new run", last)
            return None
        return str(last)
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint to resume from not found: {path}")
    return str(path)


def _final_validation(trainer: L.Trainer, task, datamodule, run_dir: Path) -> dict[str, Any]:
    """Validate once more with per-image outputs enabled; rank zero writes metrics.json and the task's files."""
    task.output_dir = run_dir
    try:
        trainer.validate(task, datamodule=datamodule, verbose=False)
    finally:
        task.output_dir = None
    if trainer.is_global_zero:
        task.write_eval_outputs(run_dir)
    return task.last_metrics


def _setup_process() -> None:
    # Denormal floats make CPU convolutions of freshly initialised networks up to 10x slower at random
    # steps; flushing them to zero changes no result that matters and keeps step times stable.
    torch.set_flush_denormal(True)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Fit the configured task; returns final metrics (empty when ``eval_after_train`` is off)."""
    run_dir = Path(run_dir)
    _setup_process()
    datamodule = instantiate(cfg.data)
    datamodule.check()  # before anything is printed or written: missing data is one line
    L.seed_everything(cfg.seed, workers=True)
    _write_run_config(cfg, run_dir)
    task = build_task(cfg)
    ckpt_dir = run_dir / "checkpoints"
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=str(run_dir),
        callbacks=_callbacks(cfg, ckpt_dir),
        logger=CSVLogger(save_dir=str(run_dir), name="logs", version=""),
    )
    trainer.fit(task, datamodule=datamodule, ckpt_path=_resolve_resume(cfg.ckpt_path, ckpt_dir))
    result: dict[str, Any] = {"run_dir": str(run_dir)}
    if cfg.eval_after_train and not cfg.trainer.get("fast_dev_run", False):
        # After fit the EMA callback has copied the averaged weights into the module.
        result["metrics"] = _final_validation(trainer, task, datamodule, run_dir)
    return result


def load_checkpoint_weights(model: torch.nn.Module, path: str | Path, prefix: str = "model.") -> dict:
    """Load the (EMA) weights of a training checkpoint into ``model``; any mismatch is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: {err})") from err
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: has no 'state_dict' (not a training checkpoint of this project)")
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    problems = state_dict_mismatches(model.state_dict(), weights, source_name="checkpoint", show=3)
    if problems:
        raise CheckpointError(
            f"{path} holds weights of another model (check backbone=, scale and data.num_classes): "
            + "; ".join(problems)
        )
    model.load_state_dict(weights, strict=True)
    return ckpt


def evaluate(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on the val split; writes metrics.json and the task's prediction files into
    ``run_dir`` (detection: predictions.json; segmentation: predictions/*.png)."""
    run_dir = Path(run_dir)
    _setup_process()
    datamodule = instantiate(cfg.data)
    datamodule.check((datamodule.val_split,))
    L.seed_everything(cfg.seed, workers=True)
    _write_run_config(cfg, run_dir)
    task = build_task(cfg)
    load_checkpoint_weights(task.model, cfg.ckpt)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in ("max_epochs", "max_steps", "gradient_clip_val", "gradient_clip_algorithm", "check_val_every_n_epoch"):
        trainer_kwargs.pop(key, None)
    trainer = L.Trainer(**trainer_kwargs, default_root_dir=str(run_dir), logger=False)
    metrics = _final_validation(trainer, task, datamodule, run_dir)
    log.info("metrics: %s", json.dumps(metrics))
    return metrics
