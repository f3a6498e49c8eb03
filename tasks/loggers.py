"""The loggers of a training run, all writing under its run directory.

``csv``: ``<run>/logs/metrics.csv`` (an earlier run's file there is kept as ``metrics.<n>.csv``). ``tensorboard``:
``<run>/logs/tensorboard/`` (``tensorboard --logdir outputs/`` finds every run; a resumed run adds an event file
next to the earlier ones). ``wandb``: Weights & Biases (project ``effdense``, the run named after its directory; its
local files under ``<run>/logs/``), where the wandb package is installed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from .config_checks import check_loggers

__all__ = ["IMAGE_LOGGERS", "image_sinks", "keep_earlier_logs", "make_loggers"]

log = logging.getLogger(__name__)

#: The loggers that take pictures (:class:`tasks.val_images.ValidationImages`).
IMAGE_LOGGERS = ("tensorboard", "wandb")


def make_loggers(names: str | Sequence[str], run_dir: str | Path) -> list[Logger]:
    """The loggers ``names`` picks (see :func:`tasks.config_checks.check_loggers`), in that order, under ``run_dir``."""
    run_dir = Path(run_dir)
    loggers: list[Logger] = []
    for name in check_loggers(names):
        if name == "csv":
            keep_earlier_logs(run_dir / "logs")
            loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version=""))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="logs", version="tensorboard",
                                             default_hp_metric=False))
        else:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(save_dir=str(run_dir / "logs"), project="effdense", name=run_dir.name))
    return loggers


def keep_earlier_logs(log_dir: Path) -> None:
    """Move an earlier run's ``metrics.csv`` in ``log_dir`` (a resumed run, or a new one in the same directory) to
    ``metrics.<n>.csv``: the CSV logger starts its file anew and would delete it."""
    from lightning.pytorch.utilities import rank_zero_only

    earlier = log_dir / "metrics.csv"
    if rank_zero_only.rank != 0 or not earlier.is_file():  # one process moves it (all may start at once)
        return
    n = 1
    while (log_dir / f"metrics.{n}.csv").exists():
        n += 1
    try:
        earlier.rename(log_dir / f"metrics.{n}.csv")
    except FileNotFoundError:  # moved meanwhile by another launch in the same directory
        return
    log.info("earlier metrics kept as %s", log_dir / f"metrics.{n}.csv")
    # Lightning's CSV logger warns that it will delete the files it finds there; it only rewrites its own.
    warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted.*")


def image_sinks(loggers: Sequence[Logger]) -> list[Any]:
    """``(tag, HxWx3 uint8 image, step) -> None`` writers, one per logger in ``loggers`` that takes images
    (TensorBoard's ``add_image``, wandb's ``log_image``); the CSV logger takes none. Call on rank zero only."""
    sinks = []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            continue
        experiment = logger.experiment
        if callable(getattr(experiment, "add_image", None)):
            sinks.append(lambda tag, image, step, w=experiment: w.add_image(tag, image, step, dataformats="HWC"))
        elif callable(getattr(logger, "log_image", None)):
            sinks.append(lambda tag, image, step, lg=logger: lg.log_image(key=tag, images=[image], step=step))
    return sinks
