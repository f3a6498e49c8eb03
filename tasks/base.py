"""The core of every task (:class:`DenseTask`): on-device normalisation of uint8 batches, the optimizer and warmup +
cosine schedule, the self-describing checkpoint and the evaluation outputs written into a run directory."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from utils.distributed import broadcast_from_rank_zero

from .captured_training import CapturedTraining, carry_step_count, store_as_eager
from .compile_options import compile_options as checked_compile_options
from .config import plain_dict
from .nonfinite import NonFiniteGuard
from .optim import WarmupCosine, param_groups
from .precise_bn import check_settings
from .rng_state import gather_rng_states, restore_rng_state

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DenseTask"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DenseTask(CapturedTraining, NonFiniteGuard, L.LightningModule):
    """Base LightningModule of the detection and segmentation tasks.

    Args:
        model: the plain ``nn.Module`` (backbone + neck + head) being trained.
        optimizer: ``params -> torch.optim.Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, lr=...)``).
        weight_decay: applied to conv/linear weights only (not to norms, biases or fusion weights).
        warmup_steps, warmup_factor, min_lr_factor: the warmup + cosine schedule, stepped per optimizer step.
        channels_last: run the model in channels-last memory format: ``True``, ``False`` or ``"auto"`` (on when the
            trainer's device is a CUDA GPU; results change only by float rounding). Settled in :meth:`setup`, before
            the optimizer is made.
        mean, std: per-channel normalisation (0..1 scale) applied on the device to uint8 images; ``None``: those the
            backbone's pretrained weights were trained with (its ``input_mean`` / ``input_std``, ImageNet's for a
            backbone that names none).
        max_nonfinite_steps: a step whose loss is NaN/inf is skipped (its update is dropped) with a warning and
            counted (``train/nonfinite_steps``); this many such steps in a row stop training with
            :class:`tasks.nonfinite.NonFiniteLossError`.
        compile: compile the model with ``torch.compile`` for training (forward and backward; validation during
            training uses it too). Done in :meth:`setup` for ``fit`` only, in place (``nn.Module.compile``), so the
            parameters, the state-dict keys and the checkpoints stay those of the plain model; evaluation
            (``tools/eval.py``) stays eager. Off by default: compiling takes minutes at the start of a run.
        compile_options: keyword arguments of ``torch.compile`` (:mod:`tasks.compile_options`); ``dynamic``
            defaults to ``False`` (training crops have one size).
        cuda_graph: capture the whole training step (forward, loss, backward, optimizer step) as one CUDA graph and
            replay it every step (:mod:`tasks.captured_training`). Needs one CUDA device, ``32-true`` or ``bf16``
            precision, no gradient accumulation and an optimizer with a fused implementation; docs/training.md,
            "The captured training step", gives the details and limits.
        precise_bn: recompute the BatchNorm statistics of the evaluated weights before every validation and for the
            final checkpoint (``enabled``, default on), over ``num_batches`` training batches (default 50) with the
            ``train`` or ``eval`` transform (default ``train``); see :mod:`tasks.precise_bn`.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Callable[[Iterable], torch.optim.Optimizer],
        weight_decay: float = 4e-5,
        warmup_steps: int = 500,
        warmup_factor: float = 0.1,
        min_lr_factor: float = 0.0,
        channels_last: bool | str = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        max_nonfinite_steps: int = 10,
        compile: bool = False,
        compile_options: Mapping[str, Any] | None = None,
        cuda_graph: bool = False,
        precise_bn: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        #: Settings of the BatchNorm statistics recomputed before evaluation (:class:`tasks.precise_bn.PreciseBN`,
        #: added by the runner): ``{"enabled": bool, "num_batches": int, "transform": "train" | "eval"}``.
        self.precise_bn = _precise_bn_settings(precise_bn)
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be true or false, got {compile!r}")
        self._setup_captured_training(cuda_graph)
        #: ``torch.compile`` the model when fitting (see :meth:`setup`), with these keyword arguments.
        self.compile_options = checked_compile_options(compile_options, compile=compile, cuda_graph=cuda_graph)
        self.compile_model = compile
        self._setup_nonfinite_guard(max_nonfinite_steps)
        self.model = model
        self.optimizer_factory = optimizer
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        self.min_lr_factor = min_lr_factor
        if channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last must be true, false or auto, got {channels_last!r}")
        #: What was asked for; :attr:`channels_last` is what is used (``"auto"`` counts as off until :meth:`setup`).
        self.channels_last_request = channels_last
        self.channels_last = channels_last != "auto" and bool(channels_last)
        backbone = getattr(model, "backbone", None)
        mean = tuple(mean) if mean is not None else getattr(backbone, "input_mean", IMAGENET_MEAN)
        std = tuple(std) if std is not None else getattr(backbone, "input_std", IMAGENET_STD)
        self.register_buffer("mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, 3, 1, 1), persistent=False)
        self.set_normalization(mean, std)
        #: Set by the runner: the resolved run config, stored in every checkpoint so it is self-describing.
        self.run_config: dict | None = None
        #: Set by the runner before a final evaluation: where per-image outputs (prediction files) go.
        self.output_dir: Path | None = None
        #: Metrics of the last validation epoch (the same on every rank).
        self.last_metrics: dict[str, Any] = {}
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Normalise inputs with ``mean`` and ``std`` (0..1 scale, per channel); also recorded in :attr:`run_config`
        when there is one, so checkpoints carry it."""
        #: The normalisation in use, as plain numbers.
        self.normalization = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
        with torch.no_grad():
            self.mean.copy_(torch.tensor(self.normalization["mean"]).view(1, 3, 1, 1) * 255.0)
            self.std.copy_(torch.tensor(self.normalization["std"]).view(1, 3, 1, 1) * 255.0)
        if getattr(self, "run_config", None) is not None:
            self.run_config["task"]["module"].update(self.normalization)

    def setup(self, stage: str) -> None:
        if self.channels_last_request == "auto" and not self.channels_last:
            device = self.trainer.strategy.root_device
            if device.type == "cuda":
                self.channels_last = True
                self.model.to(memory_format=torch.channels_last)
        if self.compile_model and stage == "fit" and not self.model_compiled:
            # In place: the module keeps its parameters and state-dict keys (no ``_orig_mod.`` prefix).
            self.model.compile(**self.compile_options)
            log.info("model compiled for training (torch.compile %s)", self.compile_options)
        if self.cuda_graph and stage == "fit":
            self._check_cuda_graph_setup()

    def run_model(self, images: torch.Tensor):
        """``self.model(images)``: the one place the tasks call the network."""
        return self.model(images)

    @property
    def model_compiled(self) -> bool:
        """Whether :attr:`model` runs through ``torch.compile`` (``compile=True`` and :meth:`setup` done)."""
        return getattr(self.model, "_compiled_call_impl", None) is not None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> normalised float (in the model's memory format)."""
        x = (images.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def sync_state_from_rank_zero(self) -> None:
        """Make every process evaluate rank 0's model. DDP keeps the parameters equal, but BatchNorm running
        statistics (and their EMA) are updated from each process's own batches; rank 0's are the ones a
        checkpoint holds, so evaluating with them makes distributed metrics equal to evaluating the checkpoint."""
        broadcast_from_rank_zero(list(self.model.parameters()) + list(self.model.buffers()))

    def log_training(self, values: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log a training step's losses (``values``, with ``"train/loss"``) without stalling the device at every step.

        Loggers read device values only at their interval (``trainer.log_every_n_steps``). The progress bar shows
        ``loss`` and ``lr``, refreshed at that interval: Lightning turns progress-bar values into Python numbers at
        every step, and reading a device value (or copying a logged Python number to the device) waits for every
        queued kernel, so they are logged as host values, read from the device at logging steps only.
        """
        for name, value in values.items():
            self.log(name, value, batch_size=batch_size)
        trainer = self._trainer
        every = int(getattr(trainer, "log_every_n_steps", 1) or 0) if trainer is not None else 1
        if every > 0 and (self.global_step == 0 or (self.global_step + 1) % every == 0):  # when loggers write
            loss = values["train/loss"].detach().float().cpu()
            lr = torch.tensor(float(self.optimizers().param_groups[0]["lr"]))
            self.log("loss", loss, prog_bar=True, logger=False, batch_size=batch_size)
            self.log("lr", lr, prog_bar=True, batch_size=batch_size)

    def log_per_class(self, per_class: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> None:
        """Log each class's ``keys`` values as ``val/<key>_per_class/<class name>`` (a class without ground truth has
        none and logs nothing). Every rank holds the same gathered numbers, so no reduction is needed."""
        for name, values in per_class.items():
            for key in keys:
                value = values.get(key)
                if value is not None and not math.isnan(float(value)):
                    self.log(f"val/{key}_per_class/{name}", float(value), rank_zero_only=False)

    def on_train_epoch_start(self) -> None:
        # The training order follows the trainer's epoch. Lightning sets the sampler's epoch from its count of
        # processed epochs, which is one ahead of it when a run with max_steps resumes from the checkpoint written
        # at an epoch's end: that run would train every later epoch on the next epoch's order.
        sampler = getattr(getattr(self._trainer, "datamodule", None), "train_sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        opt = self._make_optimizer(self.optimizer_factory, param_groups(self.model, self.weight_decay))
        total = int(self.trainer.estimated_stepping_batches)
        # A short run spends at most a fifth of its steps warming up.
        warmup = min(self.warmup_steps, total // 5)
        schedule = WarmupCosine(
            total_steps=max(total, 1), warmup_steps=warmup, warmup_factor=self.warmup_factor,
            min_factor=self.min_lr_factor,
        )
        if self.trainer.is_global_zero:
            if warmup < self.warmup_steps:
                log.info("warmup shortened from %d to %d steps: at most a fifth of this run's %d steps",
                         self.warmup_steps, warmup, total)
            peak = f"{float(opt.param_groups[0]['lr']):g}"
            log.info("learning-rate schedule: peak %s, linear warmup over %d steps from %g x, cosine to %g x at "
                     "step %d", peak, schedule.warmup_steps, self.warmup_factor, self.min_lr_factor, total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The random-number state of every process, so a resumed run continues with the same draws.
        checkpoint["effdense_rng"] = gather_rng_states()
        if self.cuda_graph:  # the optimizer state as an eager run stores it (not the captured step's runtime form)
            store_as_eager(checkpoint)
        if self.run_config is not None:
            checkpoint["effdense_config"] = self.run_config
        names = self.class_names()
        if names is not None:
            checkpoint["effdense_class_names"] = names

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        carry_step_count(checkpoint, manual=not self.automatic_optimization)
        restore_rng_state(checkpoint.get("effdense_rng"))

    def class_names(self) -> list[str] | None:
        """The dataset's class names (label order), when a datamodule with a loaded val split is attached."""
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or getattr(dm, "val_dataset", None) is None:
            return None
        try:
            return [str(n) for n in dm.class_names]
        except (AttributeError, TypeError):
            return None

    def write_eval_outputs(self, run_dir: Path, *, data: Mapping[str, Any] | None = None) -> None:
        """Write the files of a final evaluation (rank zero only): ``metrics.json`` here, with ``data`` (what was
        evaluated: format, folder, split, image count) under its ``"data"`` key; tasks add their own."""
        from utils.files import atomic_write_json

        metrics = {**self.last_metrics, **({"data": dict(data)} if data is not None else {})}
        atomic_write_json(Path(run_dir) / "metrics.json", _json_safe(metrics), indent=2)


def _precise_bn_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``precise_bn`` with its defaults, checked: unknown keys and bad values are errors naming the setting."""
    defaults = {"enabled": True, "num_batches": 50, "transform": "train"}
    settings = plain_dict(settings or {})
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"task.module.precise_bn: unknown key(s) {unknown}; it takes {sorted(defaults)}")
    out = {**defaults, **settings}
    if not isinstance(out["enabled"], bool):
        raise TypeError(f"task.module.precise_bn.enabled must be true or false, got {out['enabled']!r}")
    check_settings(num_batches=out["num_batches"], transform=out["transform"])
    return out


def _json_safe(obj: Any) -> Any:
    """Metrics as strict JSON: plain floats, and ``null`` for NaN (a metric with nothing to measure)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    value = float(obj)
    return None if math.isnan(value) or math.isinf(value) else value
