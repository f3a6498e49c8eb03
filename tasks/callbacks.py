"""Training callbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, WeightAveraging
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.optim.swa_utils import AveragedModel

from utils.distributed import broadcast_from_rank_zero
from utils.files import atomic_path

__all__ = [
    "EMA", "AtomicCheckpointIO", "SaveLastAtEpochEnd", "SaveLastAtMaxSteps", "SaveLastOnTrainEnd", "SharedLastCheckpoint",
    "SyncNormLayers",
]


def ema_weight(decay: float, warmup: bool, num_averaged: int) -> float:
    """The weight of the current value in the update after ``num_averaged`` earlier ones: ``1 - d`` with
    ``d = decay``, or with ``warmup`` ``d = min(decay, (1 + n) / (10 + n))``: early on the average follows the
    weights closely, so short runs are not evaluated with weights that are still mostly the initialisation."""
    d = min(decay, (1.0 + num_averaged) / (10.0 + num_averaged)) if warmup else decay
    return 1.0 - d


class _EmaModel(AveragedModel):
    """The averaged copy, updated with a handful of multi-tensor operations and no host synchronisation.

    ``torch.optim.swa_utils.AveragedModel`` with an ``avg_fn`` updates tensor by tensor, and a decay that depends
    on the update count reads that count from the device for every tensor: thousands of operations and hundreds of
    host synchronisations per training step for an EfficientDet. Here the
    count is mirrored on the host, so the decay is a plain number, and all floating-point tensors are updated
    together: ``average += (current - average) * (1 - d)``, the same arithmetic in the same order. Integer buffers
    (BatchNorm's ``num_batches_tracked``) take the current value.
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool, device: torch.device | None) -> None:
        super().__init__(model, device=device, use_buffers=True)
        self.decay = decay
        self.warmup = warmup
        self._host_count: int | None = 0  # mirror of the n_averaged buffer; None: read it from the buffer

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._host_count = None
        return result

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged, current = _state_tensors(self.module), _state_tensors(model)
        if len(averaged) != len(current):
            raise RuntimeError(
                f"EMA: the model has {len(current)} parameters and buffers, its average {len(averaged)}: "
                "the model's structure changed after the average was made"
            )
        current = [c if c.device == a.device else c.to(a.device) for a, c in zip(averaged, current)]
        if self._host_count is None:
            self._host_count = int(self.n_averaged)
        if self._host_count == 0:
            torch._foreach_copy_(averaged, current)
        else:
            avg_f, cur_f, avg_i, cur_i = [], [], [], []
            for a, c in zip(averaged, current):
                avg, cur = (avg_f, cur_f) if a.is_floating_point() else (avg_i, cur_i)
                avg.append(a)
                cur.append(c)
            if avg_f:
                delta = torch._foreach_sub(cur_f, avg_f)
                torch._foreach_mul_(delta, ema_weight(self.decay, self.warmup, self._host_count))
                torch._foreach_add_(avg_f, delta)
            if avg_i:
                torch._foreach_copy_(avg_i, cur_i)
        self.n_averaged += 1
        self._host_count += 1


class EMA(WeightAveraging):
    """Exponential moving average of the weights (and BatchNorm buffers), updated every optimizer step.

    Validation and checkpoints (``state_dict``) use the averaged weights; the raw weights are kept in the
    checkpoint so training resumes exactly. ``warmup`` ramps the decay as ``min(decay, (1+n)/(10+n))``.
    The update is a few multi-tensor operations with no host synchronisation (see :class:`_EmaModel`).
    """

    def __init__(self, *, decay: float = 0.9998, warmup: bool = True, update_every_n_steps: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(use_buffers=True)
        self.decay = decay
        self.warmup = warmup
        self.update_every_n_steps = update_every_n_steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            # Lightning reports the device the module will train on, before it is moved there.
            self._average_model = _EmaModel(pl_module, decay=self.decay, warmup=self.warmup, device=pl_module.device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The module's setup may have changed its memory format (channels-last on a GPU) after the average was
        # copied: give the average the same layout, so the multi-tensor update runs on matching tensors.
        if self._average_model is not None:
            _match_layout(self._average_model.module, pl_module)
        super().on_fit_start(trainer, pl_module)

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


def _state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, in registration order: how the average and the model are paired."""
    return [*module.parameters(), *module.buffers()]


def _match_layout(average: nn.Module, current: nn.Module) -> None:
    """Give each tensor of ``average`` the strides of the matching tensor of ``current`` (values unchanged)."""
    with torch.no_grad():
        for a, c in zip(_state_tensors(average), _state_tensors(current)):
            if a.shape == c.shape and a.stride() != c.stride():
                a.data = torch.empty_like(c, dtype=a.dtype, device=a.device).copy_(a)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it and renames it over the target,
    so a crash during a save never leaves a truncated ``last.ckpt`` (the previous one stays intact)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)


def _last_checkpoint_path(dirpath: str | Path) -> Path:
    """``<dirpath>/last.ckpt``, as :class:`ModelCheckpoint` names it."""
    return Path(dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


class SharedLastCheckpoint(ModelCheckpoint):
    """Lightning's :class:`ModelCheckpoint` for a run whose ``last.ckpt`` several callbacks write.

    - No version counter: every writer of ``last.ckpt`` means that file, not a ``last-v1.ckpt`` beside a stale one.
    - No save of ``last.ckpt`` when training ends. That save runs after the other callbacks' ``on_train_end``, where
      the EMA callback has copied the averaged weights into the module: the checkpoint would hold them as the raw
      weights too, and a run resumed from it would go on training the average. Lightning makes it when this process
      has not written ``last.ckpt`` itself yet (a resumed run that reaches ``max_steps`` before an epoch ends).
      :class:`SaveLastAtMaxSteps` and :class:`SaveLastOnTrainEnd` write ``last.ckpt`` at the end of training, before
      the EMA callback's copy.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**{"enable_version_counter": False, **kwargs})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


class SaveLastAtMaxSteps(Checkpoint):
    """Writes ``last.ckpt`` at the end of the step that reaches ``max_steps``, as a step-interval checkpoint would.

    Written there, the checkpoint's loop state says "this many batches of this epoch are done", so a run resumed
    from it with a larger ``max_steps`` goes on with the next batch of the same epoch. Written after training ends
    (Lightning then counts the interrupted epoch as finished), the resumed run would start the next epoch at the
    batch index where the last one stopped, skipping batches. A :class:`~lightning.pytorch.callbacks.Checkpoint`,
    so Lightning runs it after the other callbacks' ``on_train_batch_end`` (the EMA update of the step is in it).
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        #: The global step of the last checkpoint written (``None``: none yet).
        self.saved_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0 or trainer.global_step < trainer.max_steps:
            return
        if trainer.sanity_checking or trainer.fast_dev_run or self.saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(str(_last_checkpoint_path(self.dirpath)))
        self.saved_step = trainer.global_step


class SaveLastAtEpochEnd(Checkpoint):
    """Writes ``last.ckpt`` at the end of every training epoch, for runs that do not validate after every epoch (the
    main checkpoint callback writes it after validation), so a stopped run loses at most the epoch it was in.
    Skipped where ``checkpoint`` (after a validation) or :class:`SaveLastAtMaxSteps` (one of ``others``) has just
    written the step."""

    def __init__(self, dirpath: str | Path, checkpoint: ModelCheckpoint, *others: SaveLastAtMaxSteps) -> None:
        self.dirpath = Path(dirpath)
        self.checkpoint = checkpoint
        self.others = others
        #: The global step of the last checkpoint written (``None``: none yet).
        self.saved_step: int | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or self.saved_step == trainer.global_step:
            return
        if any(other.saved_step == trainer.global_step for other in self.others):
            return
        if getattr(self.checkpoint, "_last_global_step_saved", None) == trainer.global_step:
            return
        trainer.save_checkpoint(str(_last_checkpoint_path(self.dirpath)))
        self.saved_step = trainer.global_step


class SaveLastOnTrainEnd(L.Callback):
    """Writes ``last.ckpt`` when training ends between the checkpoint saves (stopped in the middle of an epoch by
    something other than ``max_steps``, which :class:`SaveLastAtMaxSteps` covers), so it always holds the final
    weights, optimizer and EMA state.

    Put it before the EMA callback: at ``on_train_end`` the EMA callback copies the averaged weights into the
    module, and the checkpoint must be written before that (it stores both, as during training).
    """

    def __init__(self, checkpoint: ModelCheckpoint, *others: SaveLastAtMaxSteps | SaveLastAtEpochEnd) -> None:
        self.checkpoint = checkpoint
        self.others = others

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == getattr(self.checkpoint, "_last_global_step_saved", None):
            return
        if any(other.saved_step == trainer.global_step for other in self.others):
            return
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(str(_last_checkpoint_path(self.checkpoint.dirpath)))


class SyncNormLayers(TorchSyncBatchNorm):
    """``trainer.sync_batchnorm=true`` for models with timm's fused norm + activation layers.

    Lightning's own conversion turns every BatchNorm into a plain ``SyncBatchNorm``: a timm ``BatchNormAct2d``
    (norm, then its activation) loses its activation, which silently trains another network. Here timm's conversion
    keeps them whole (``SyncBatchNormAct``), and :meth:`revert` (after training) gives each layer back its own
    module, holding the trained parameters and statistics.
    """

    def __init__(self) -> None:
        super().__init__()
        self._originals: dict[int, nn.Module] = {}

    def apply(self, model: nn.Module) -> nn.Module:
        from timm.layers import convert_sync_batchnorm

        if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, nn.SyncBatchNorm):
            synced = convert_sync_batchnorm(model)  # the layer and its activation and dropout children
            self._originals[id(synced)] = model
            return synced
        for name, child in list(model.named_children()):
            model.add_module(name, self.apply(child))
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        original = self._originals.pop(id(model), None)
        if original is not None:
            # The synced layer shares its parameters with the original, but buffers moved to the device are new
            # tensors: take everything from the synced layer.
            original._parameters.update(model._parameters)
            original._buffers.update(model._buffers)
            original.training = model.training
            model = original
        for name, child in list(model.named_children()):
            model.add_module(name, self.revert(child))
        return model
