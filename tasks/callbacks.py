"""Training callbacks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging

from .distributed import broadcast_from_rank_zero

__all__ = ["EMA", "AtomicCheckpointIO", "SaveLastOnTrainEnd"]


def _ema_with_warmup(decay: float, warmup: bool):
    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = decay
        if warmup:
            # Early on the average follows the weights closely, so short runs are not evaluated with
            # weights that are still mostly the random initialisation.
            n = float(num_averaged)
            d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged + (current - averaged) * (1.0 - d)

    return avg_fn


class EMA(WeightAveraging):
    """Exponential moving average of the weights (and BatchNorm buffers), updated every optimizer step.

    Validation and checkpoints (``state_dict``) use the averaged weights; the raw weights are kept in the
    checkpoint so training resumes exactly. ``warmup`` ramps the decay as ``min(decay, (1+n)/(10+n))``.
    """

    def __init__(self, *, decay: float = 0.9998, warmup: bool = True, update_every_n_steps: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(use_buffers=True, avg_fn=_ema_with_warmup(decay, warmup))
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def _sync_average(self) -> None:
        """Give every process rank 0's average. Parameters agree across DDP processes, but BatchNorm statistics
        are averaged from each process's own batches; rank 0's are the ones checkpoints hold."""
        if self._average_model is not None:
            broadcast_from_rank_zero(list(self._average_model.parameters()) + list(self._average_model.buffers()))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync_average()
        super().on_validation_epoch_start(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync_average()
        super().on_train_end(trainer, pl_module)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it and renames it over the target,
    so a crash during a save never leaves a truncated ``last.ckpt`` (the previous one stays intact)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


class SaveLastOnTrainEnd(L.Callback):
    """Writes ``last.ckpt`` when training ends between the :class:`ModelCheckpoint` saves (``max_steps`` reached
    in the middle of an epoch), so it always holds the final weights, optimizer and EMA state.

    Put it before the EMA callback: at ``on_train_end`` the EMA callback copies the averaged weights into the
    module, and the checkpoint must be written before that (it stores both, as during training).
    """

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == getattr(self.checkpoint, "_last_global_step_saved", None):
            return
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        path = Path(self.checkpoint.dirpath) / f"{self.checkpoint.CHECKPOINT_NAME_LAST}{self.checkpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(str(path))
