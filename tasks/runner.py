"""Train and evaluate from a composed config. ``tools/train.py`` and ``tools/eval.py`` are thin wrappers."""

from __future__ import annotations

import json
import logging
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from utils.state_dicts import state_dict_mismatches

from .callbacks import (
    EMA,
    AtomicCheckpointIO,
    SaveLastAtEpochEnd,
    SaveLastAtMaxSteps,
    SaveLastOnTrainEnd,
    SharedLastCheckpoint,
    SyncNormLayers,
)
from .checkpoint import CheckpointError, merge_checkpoint_config, read_checkpoint, trained_normalization
from .config_checks import check_loggers, check_run_config
from .interrupt import StopOnSignal
from .loggers import IMAGE_LOGGERS, make_loggers
from .precise_bn import PreciseBN
from .val_images import ValidationImages

__all__ = ["CheckpointError", "build_model", "build_task", "evaluate", "load_checkpoint_weights", "train", "trainer_kwargs"]

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig) -> torch.nn.Module:
    return instantiate(cfg.model)


def build_task(cfg: DictConfig, model: torch.nn.Module | None = None) -> L.LightningModule:
    model = build_model(cfg) if model is None else model
    task = instantiate(cfg.task.module, model=model)
    task.run_config = OmegaConf.to_container(cfg, resolve=True)
    # The normalisation in use (the backbone's unless set), so the checkpoint's config evaluates with the same.
    task.run_config["task"]["module"].update(getattr(task, "normalization", {}))
    if getattr(task, "cuda_graph", False):  # the captured step clips its gradients itself (see trainer_kwargs)
        clip = cfg.trainer.get("gradient_clip_val")
        if clip:
            # Lightning's rule, which does not see these settings here: "norm" or "value", in any case.
            algorithm = str(cfg.trainer.get("gradient_clip_algorithm") or "norm").lower()
            if algorithm not in ("norm", "value"):
                raise ValueError(f"trainer.gradient_clip_algorithm must be 'norm' or 'value', got "
                                 f"{cfg.trainer.gradient_clip_algorithm!r}")
            task.gradient_clipping = (float(clip), algorithm)
    return task


def resume_command(run_dir: Path, overrides: Sequence[str]) -> str:
    """The command that resumes the run in ``run_dir`` started with ``overrides``."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir")]
    return " ".join(["python tools/train.py", *map(shlex.quote, kept), "ckpt_path=last",
                     shlex.quote(f"hydra.run.dir={run_dir}")])


def _callbacks(cfg: DictConfig, ckpt_dir: Path, task: L.LightningModule, resume: str = "") -> list[L.Callback]:
    monitor = cfg.checkpoint.monitor
    checkpoint = SharedLastCheckpoint(
        dirpath=ckpt_dir,
        filename=f"best-{{epoch:03d}}-{{{monitor}:.4f}}",
        monitor=monitor,
        mode=cfg.checkpoint.mode,
        save_top_k=cfg.checkpoint.save_top_k,
        save_last=True,
        auto_insert_metric_name=False,
    )
    at_max_steps = SaveLastAtMaxSteps(ckpt_dir)
    savers: list[L.Callback] = [at_max_steps]
    if not _validates_every_epoch(cfg):  # last.ckpt at every epoch end all the same
        savers.append(SaveLastAtEpochEnd(ckpt_dir, checkpoint, at_max_steps))
    # SaveLastOnTrainEnd before EMA (see its docstring); Lightning runs the Checkpoint callbacks last.
    callbacks: list[L.Callback] = [checkpoint, SaveLastOnTrainEnd(checkpoint, *savers), *savers,
                                   StopOnSignal(ckpt_dir, resume)]
    every = cfg.checkpoint.get("every_n_train_steps")
    if every:  # last.ckpt every N steps as well, so a killed run loses at most N steps
        callbacks.insert(1, SharedLastCheckpoint(dirpath=ckpt_dir, every_n_train_steps=int(every), save_last=True,
                                                 save_top_k=0))
    callbacks += loop_callbacks(cfg)
    settings = getattr(task, "precise_bn", None) or {}
    if settings.get("enabled"):  # after the EMA callback: the statistics are those of the averaged weights
        callbacks.append(PreciseBN(num_batches=settings["num_batches"], transform=settings["transform"]))
    return callbacks


def _validates_every_epoch(cfg: DictConfig) -> bool:
    """Whether validation runs at the end of every epoch (where the main checkpoint callback writes last.ckpt)."""
    t = cfg.trainer
    every = t.get("check_val_every_n_epoch", 1)
    interval = t.get("val_check_interval", None)
    return every == 1 and t.get("limit_val_batches", 1.0) not in (0, 0.0) and interval in (None, 1.0)


def loop_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks of the training loop other than checkpointing: learning-rate logging and the EMA."""
    callbacks: list[L.Callback] = [LearningRateMonitor(logging_interval="step")]
    if cfg.ema.enabled:
        callbacks.append(EMA(decay=cfg.ema.decay, warmup=cfg.ema.warmup))
    return callbacks


def trainer_kwargs(cfg: DictConfig, *, training: bool = True) -> dict[str, Any]:
    """``cfg.trainer`` as ``lightning.Trainer`` keyword arguments, with ``precision: auto`` settled.

    Training: ``bf16-mixed`` on a CUDA GPU with native bfloat16 (compute capability 8.0+; the weights and
    optimizer stay float32), ``32-true`` otherwise. Validation during training runs in the same precision.
    Evaluation (``training=False``, ``tools/eval.py``): ``32-true``. Fork-based strategies (``ddp_fork``,
    ``ddp_notebook``) must not start CUDA before they fork, so there ``auto`` means ``32-true``: set the precision.
    With ``task.module.cuda_graph`` the gradient clipping is left out: the task's captured step clips (Lightning
    clips only when it steps the optimizer itself).
    """
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if training and cfg.task.module.get("cuda_graph", False):
        kwargs.pop("gradient_clip_val", None)
        kwargs.pop("gradient_clip_algorithm", None)
    if kwargs.get("precision") == "auto":
        bf16 = training and _native_bf16_gpu(kwargs.get("accelerator", "auto"), kwargs.get("strategy", "auto"))
        kwargs["precision"] = "bf16-mixed" if bf16 else "32-true"
    return kwargs


def _native_bf16_gpu(accelerator: str, strategy: Any) -> bool:
    from utils.devices import native_bf16_cuda

    if str(accelerator) not in ("auto", "gpu", "cuda"):
        return False
    if isinstance(strategy, str) and ("fork" in strategy or "notebook" in strategy):
        return False
    return native_bf16_cuda()


def _write_run_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "config.yaml")


class _WriteRunConfig(L.Callback):
    """Writes the run's ``config.yaml`` once training has started (model, optimizer and data set up), so a run that
    fails on a bad value leaves the one of the run before it."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            _write_run_config(self.cfg, self.run_dir)


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


def _check_new_run_dir(run_dir: Path, ckpt_dir: Path) -> None:
    """A :class:`CheckpointError` when a new run would start in a run directory that holds checkpoints: its
    ``last.ckpt`` and ``config.yaml`` would be replaced."""
    found = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name)) if ckpt_dir.is_dir() else []
    if found:
        raise CheckpointError(
            f"{run_dir} already holds a run ({found[0]}): resume it with ckpt_path=last, or start the new run in "
            "another directory (hydra.run.dir=...)"
        )


def _check_resume(path: str, task: L.LightningModule) -> dict:
    """:class:`CheckpointError` naming ``path`` when it is not a checkpoint this task can resume from (unreadable,
    truncated, or of another model: other backbone, scale or class count); returns the checkpoint."""
    ckpt = read_checkpoint(path)
    problems = state_dict_mismatches(task.state_dict(), ckpt["state_dict"], source_name="checkpoint", show=3)
    if problems:
        raise CheckpointError(
            f"{path}: cannot resume this run from it, it holds another model (check backbone=, scale and "
            "data.num_classes, or start a new run with init_from=): " + "; ".join(problems)
        )
    return ckpt


def _final_validation(trainer: L.Trainer, task, datamodule, run_dir: Path) -> dict[str, Any]:
    """Validate once more with per-image outputs enabled; rank zero writes metrics.json and the task's files.

    The whole val split, whatever ``trainer.limit_val_batches`` limited validation during training to."""
    if trainer.limit_val_batches != 1.0:
        log.info("final evaluation on the whole val split (trainer.limit_val_batches=%s limited validation during "
                 "training)", trainer.limit_val_batches)
        trainer.limit_val_batches = 1.0
    task.output_dir = run_dir
    try:
        trainer.validate(task, datamodule=datamodule, verbose=False)
    finally:
        task.output_dir = None
    data = datamodule.describe(datamodule.val_split)
    if trainer.is_global_zero:
        log.info("evaluated %s images of split %s: %s%s data in %s", data["images"], data["split"], data["format"],
                 " (generated)" if data["synthetic"] else "", data["root"])
        task.write_eval_outputs(run_dir, data=data)
    return task.last_metrics


def _setup_process() -> None:
    # Denormal floats make CPU convolutions of freshly initialised networks erratically slow; flushing them to zero
    # changes no result that matters and keeps step times stable.
    torch.set_flush_denormal(True)


def train(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Fit the configured task; returns final metrics (empty when ``eval_after_train`` is off).

    With ``init_from=PATH`` the model's structure comes from that checkpoint and its weights initialise the
    model (class layers re-initialised when the class count differs); ``overrides`` are the command line's
    ``key=value`` items (see :func:`tasks.checkpoint.merge_checkpoint_config`)."""
    run_dir = Path(run_dir)
    _setup_process()
    init = None
    if cfg.get("init_from"):
        init = read_checkpoint(cfg.init_from)
        cfg = merge_checkpoint_config(cfg, init.get("effdense_config"), overrides, mode="finetune", source=cfg.init_from)
    check_run_config(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.check()  # before anything is printed or written: missing data is one line
    L.seed_everything(cfg.seed, workers=True)
    task = build_task(cfg)
    if init is not None:
        load_finetune_weights(task.model, init, source=cfg.init_from)
    ckpt_dir = run_dir / "checkpoints"
    resume = _resolve_resume(cfg.ckpt_path, ckpt_dir)
    if resume is not None:  # before anything is written: a bad checkpoint leaves the run directory as it was
        stored = _check_resume(resume, task).get("effdense_config")
        if stored and cfg.task.module.get("mean") is None and cfg.task.module.get("std") is None:
            # The normalisation the run was trained with (ImageNet's for runs started before it was stored).
            mean, std = trained_normalization(stored)
            if mean is not None and std is not None:
                task.set_normalization(mean, std)
        # The data module resumes the training order itself (its state is in the checkpoint); Lightning's warning
        # that the loader cannot does not apply.
        warnings.filterwarnings("ignore", message=r".*not resumable.*")
    else:
        _check_new_run_dir(run_dir, ckpt_dir)
    loggers = make_loggers(cfg.get("logger", "csv"), run_dir)
    callbacks = [*_callbacks(cfg, ckpt_dir, task, resume_command(run_dir, overrides)), _WriteRunConfig(cfg, run_dir)]
    pictures = cfg.get("val_images") or {}
    if pictures.get("num", 0) and any(name in IMAGE_LOGGERS for name in check_loggers(cfg.get("logger", "csv"))):
        callbacks.append(ValidationImages(num_images=pictures.num, score_threshold=pictures.score_threshold))
    kwargs = trainer_kwargs(cfg, training=True)
    # timm's fused norm + activation layers stay whole under sync_batchnorm (Lightning's conversion drops the act).
    layer_sync = [SyncNormLayers()] if kwargs.get("sync_batchnorm") else []
    trainer = L.Trainer(
        **kwargs,
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        logger=loggers,
        plugins=[AtomicCheckpointIO(), *layer_sync],
    )
    # Checkpoints hold tensors and plain data only: resume without unpickling arbitrary objects.
    trainer.fit(task, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    result: dict[str, Any] = {"run_dir": str(run_dir)}
    if cfg.trainer.get("fast_dev_run", False):
        return result
    if cfg.eval_after_train:
        # After fit the EMA callback has copied the averaged weights into the module.
        result["metrics"] = _final_validation(trainer, task, datamodule, run_dir)
    precise = next((c for c in trainer.callbacks if isinstance(c, PreciseBN)), None)
    if precise is not None:
        _finish_last_checkpoint(trainer, task, precise, ckpt_dir / "last.ckpt")
    return result


def _finish_last_checkpoint(trainer: L.Trainer, task, precise: PreciseBN, path: Path) -> None:
    """Give the final ``last.ckpt`` the BatchNorm statistics recomputed for the final weights (when training ended),
    so evaluating, predicting with or exporting it uses the network that the final evaluation measured.

    Only the inference weights' running statistics change (``state_dict``); the raw weights, optimizer and loop state
    stay as written. A run extended from this checkpoint starts its EMA's BatchNorm buffers from these statistics
    (they are recomputed again before every evaluation). A checkpoint of an earlier step is left."""
    if precise.step != trainer.global_step or not trainer.is_global_zero or not path.is_file():
        return
    ckpt = read_checkpoint(path)
    if ckpt.get("global_step") != trainer.global_step:
        return
    state = ckpt["state_dict"]
    for name, (mean, var) in precise.statistics.items():
        state[f"model.{name}.running_mean"] = mean.detach().cpu().clone()
        state[f"model.{name}.running_var"] = var.detach().cpu().clone()
    ckpt["effdense_norm_statistics"] = {"step": trainer.global_step, "num_batches": precise.num_batches,
                                        "transform": precise.transform}
    AtomicCheckpointIO().save_checkpoint(ckpt, path)


def load_checkpoint_weights(
    model: torch.nn.Module, path: str | Path | dict, prefix: str = "model.", *, source: str | Path | None = None
) -> dict:
    """Load the (EMA) weights of a checkpoint (a path or an already loaded dict) into ``model``; any mismatch is a
    :class:`CheckpointError` naming the file."""
    ckpt = read_checkpoint(path) if not isinstance(path, dict) else path
    source = source if source is not None else path if not isinstance(path, dict) else "checkpoint"
    weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    problems = state_dict_mismatches(model.state_dict(), weights, source_name="checkpoint", show=3)
    if problems:
        raise CheckpointError(
            f"{source} holds weights of another model (check backbone=, scale and data.num_classes): "
            + "; ".join(problems)
        )
    model.load_state_dict(weights, strict=True)
    return ckpt


def load_finetune_weights(model: torch.nn.Module, ckpt: dict, *, source: str | Path, prefix: str = "model.") -> list[str]:
    """Initialise ``model`` from a checkpoint of the same architecture with possibly another class count.

    Weights whose shape differs only because of the class count (the head's class prediction layers, named
    by ``model.head.class_specific_prefixes``) keep their fresh initialisation; every other key must match.
    Returns the re-initialised keys (also logged)."""
    weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    target = model.state_dict()
    head = getattr(model, "head", None)
    class_prefixes = tuple(f"head.{p}" for p in getattr(head, "class_specific_prefixes", ()))
    reinit = [
        k for k, v in target.items()
        if k in weights and weights[k].shape != v.shape and k.startswith(class_prefixes)
    ]
    kept = {k: v for k, v in weights.items() if k not in reinit}
    problems = state_dict_mismatches({k: v for k, v in target.items() if k not in reinit}, kept,
                                     source_name="checkpoint", show=3)
    if problems:
        raise CheckpointError(f"{source} does not fit this model beyond its class layers: " + "; ".join(problems))
    model.load_state_dict({**target, **kept}, strict=True)
    if reinit:
        log.warning("fine-tuning from %s: re-initialised %d class-specific tensors: %s", source, len(reinit),
                    ", ".join(reinit))
    else:
        log.info("fine-tuning from %s: every weight loaded", source)
    return reinit


def evaluate(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on the val split; writes metrics.json and the task's prediction files into
    ``run_dir`` (detection: predictions.json; segmentation: predictions/*.png)."""
    run_dir = Path(run_dir)
    _setup_process()
    ckpt = read_checkpoint(cfg.ckpt)
    cfg = merge_checkpoint_config(cfg, ckpt.get("effdense_config"), overrides, mode="eval", source=cfg.ckpt)
    check_run_config(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.check((datamodule.val_split,))
    L.seed_everything(cfg.seed, workers=True)
    task = build_task(cfg)
    load_checkpoint_weights(task.model, ckpt, source=cfg.ckpt)
    kwargs = trainer_kwargs(cfg, training=False)
    for key in ("max_epochs", "max_steps", "gradient_clip_val", "gradient_clip_algorithm", "check_val_every_n_epoch"):
        kwargs.pop(key, None)
    trainer = L.Trainer(**kwargs, default_root_dir=str(run_dir), logger=False)
    metrics = _final_validation(trainer, task, datamodule, run_dir)
    _write_run_config(cfg, run_dir)  # once the evaluation has run: a failed one leaves the folder's earlier files
    log.info("metrics: %s", json.dumps(metrics))
    return metrics
