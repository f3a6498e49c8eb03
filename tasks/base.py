"""What every task shares: on-device normalisation of uint8 batches, the optimizer and warmup + cosine
schedule, the self-describing checkpoint and the evaluation outputs written into a run directory."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from utils.distributed import broadcast_from_rank_zero, is_distributed, rank_and_world

from .optim import WarmupCosine, param_groups
from .precise_bn import check_settings

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DenseTask", "NonFiniteLossError"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: The keyword arguments of ``torch.compile`` that ``compile_options`` may set.
COMPILE_OPTIONS = frozenset({"backend", "mode", "dynamic", "fullgraph", "options"})


#: The captured-step state of a task that has none yet: the step (made at the first training step of a fit), the
#: step whose finite flag is still to be read (captured steps), whether the shape warning was given.
_NO_CAPTURED_STEP: dict[str, Any] = {"_captured_step": None, "_unread_step": -1, "_warned_shapes": False}


class NonFiniteLossError(RuntimeError):
    """The training loss kept being NaN or infinite."""


class _SkipUpdate(Exception):
    """Raised after the backward pass of a skipped step, before the optimizer changes anything."""


class _DeviceFlag:
    """Flags computed on the device, read on the host later: on CUDA the flag is copied into pinned memory behind
    the work queued so far, with an event, so reading it waits for that point of the stream only, not for work
    queued after it (the backward pass). Flags recorded before one read (gradient accumulation) combine: the read
    is true only if all were."""

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None
        self._event = None
        self._flag: torch.Tensor | None = None  # the combined flag of the unread records (on its device)
        self._payloads: list[torch.Tensor] = []

    def __getstate__(self) -> dict:  # a copy of the task starts with no pending flag (CUDA events do not pickle)
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def record(self, flag: torch.Tensor, payload: torch.Tensor) -> None:
        self._flag = flag if self._flag is None else torch.minimum(self._flag, flag)
        self._payloads.append(payload)
        if flag.device.type == "cuda":
            if self._host is None or self._event is None:
                self._host = torch.empty((), dtype=flag.dtype, pin_memory=True)
                self._event = torch.cuda.Event()
            self._host.copy_(self._flag, non_blocking=True)
            self._event.record(torch.cuda.current_stream(flag.device))

    def read(self) -> tuple[bool, list[torch.Tensor]] | None:
        """``(all flags true, payloads)`` of the records since the last read, else ``None``."""
        if self._flag is None:
            return None
        flag, payloads = self._flag, self._payloads
        self._flag, self._payloads = None, []
        if flag.device.type == "cuda":
            self._event.synchronize()
            flag = self._host
        return bool(flag), payloads


class DenseTask(L.LightningModule):
    """Base LightningModule of the detection and segmentation tasks.

    Args:
        model: the plain ``nn.Module`` (backbone + neck + head) being trained.
        optimizer: ``params -> torch.optim.Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, lr=...)``).
        weight_decay: applied to conv/linear weights only (not to norms, biases or fusion weights).
        warmup_steps, warmup_factor, min_lr_factor: the warmup + cosine schedule, stepped per optimizer step.
        channels_last: run the model in channels-last memory format: ``True``, ``False`` or ``"auto"`` (on when the
            trainer's device is a CUDA GPU, where convolutions are faster in it; results change only by float
            rounding). Settled in :meth:`setup`, before the optimizer is made.
        mean, std: per-channel normalisation (0..1 scale) applied on the device to uint8 images; ``None``: those the
            backbone's pretrained weights were trained with (its ``input_mean`` / ``input_std``, ImageNet's for a
            backbone that names none).
        max_nonfinite_steps: a step whose loss is NaN/inf is skipped (its update is dropped) with a warning and
            counted (``train/nonfinite_steps``); this many such steps in a row stop training with
            :class:`NonFiniteLossError`.
        compile: compile the model with ``torch.compile`` for training (forward and backward; validation during
            training uses it too). Done in :meth:`setup` for ``fit`` only, in place (``nn.Module.compile``), so the
            parameters, the state-dict keys and the checkpoints stay those of the plain model; evaluation
            (``tools/eval.py``) stays eager. Off by default: compiling takes minutes at the start of a run.
        compile_options: keyword arguments of ``torch.compile`` (``backend``, ``mode``, ``dynamic``,
            ``fullgraph``, ``options``); ``dynamic`` defaults to ``False`` (training crops have one size; each
            other shape, e.g. a smaller last validation batch, is compiled once more).
        cuda_graph: capture the whole training step (normalisation, forward, target assignment, loss, backward,
            gradient clipping, optimizer step) as one CUDA graph and replay it every step: one launch instead of
            thousands, for training steps that are bound by the host launching kernels (EfficientDet's small maps on a
            fast GPU). The first three steps run eagerly (warm-up: momentum buffers, cuDNN autotuning), the fourth is
            captured; each step still trains once on its own batch. Needs one CUDA device (no DDP), ``32-true`` or
            ``bf16-mixed`` precision, no gradient accumulation, and an optimizer with a fused CUDA
            implementation (``torch.optim.SGD``, ``Adam``, ``AdamW``: made with ``fused=True``, its learning rate a
            device tensor that the schedule updates in place). The graph replays one shape: training crops have
            one, and detection pads its boxes to a fixed count; a batch of another shape (more boxes, a smaller
            last batch) runs the same step eagerly, with a warning. Gradient clipping comes from the trainer's
            ``gradient_clip_val`` (:attr:`gradient_clipping`, set by :func:`tasks.runner.build_task`). A step whose loss
            or gradient norm is not finite is skipped on the device (the optimizer's ``found_inf``); the host counts it
            one step later, without waiting for the device. Lightning's ``on_before_backward``,
            ``on_after_backward`` and ``on_before_optimizer_step`` hooks do not run (the step is one graph). A run
            resumes from a checkpoint written with or without the captured step, either way (the optimizer state,
            the step count and the schedule carry over). The graph's memory (activations of one step) stays reserved
            while validation runs. With ``compile`` as well, the compiled network (compiled in the warm-up steps)
            is what the graph captures: fused kernels, launched once per step; not with the ``compile_options``
            that make torch.compile take CUDA graphs itself (``reduce-overhead``, ``max-autotune``).
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
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be true or false, got {cuda_graph!r}")
        #: Whether the training step runs as one captured CUDA graph (see the class docstring).
        self.cuda_graph = cuda_graph
        if cuda_graph:  # the task steps the optimizer itself: the whole step is one graph
            self.automatic_optimization = False
        #: The captured step's gradient clipping, ``(max value, "norm" | "value")``, or ``None``.
        self.gradient_clipping: tuple[float, str] | None = None
        self._reset_captured_step()
        if compile_options is not None and not isinstance(compile_options, Mapping):
            raise ValueError(f"compile_options must be a mapping, got {compile_options!r}")
        options = _plain(compile_options or {})
        unknown = sorted(set(options) - COMPILE_OPTIONS)
        if unknown:
            raise ValueError(
                f"compile_options: unknown key(s) {unknown}; torch.compile takes {sorted(COMPILE_OPTIONS)}"
            )
        if options.get("mode") is not None and options.get("options") is not None:
            raise ValueError("compile_options: set mode or options, not both (torch.compile takes one of them)")
        if cuda_graph and compile:
            if _compiles_cuda_graphs(options):
                raise ValueError(
                    f"task.module.cuda_graph=true captures the whole training step as one CUDA graph, and "
                    f"compile_options {options} make torch.compile take CUDA graphs of its own inside it: use the "
                    "default mode or max-autotune-no-cudagraphs (or task.module.cuda_graph=false)")
            options = _without_inductor_cuda_graphs(options)
        #: ``torch.compile`` the model when fitting (see :meth:`setup`), with these keyword arguments.
        self.compile_model = compile
        self.compile_options = {"dynamic": False, **options}
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        #: Steps skipped because of a non-finite loss (in total, and in a row).
        self.nonfinite_steps = 0
        self._nonfinite_run = 0
        self._finite = _DeviceFlag()
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

    def _check_cuda_graph_setup(self) -> None:
        trainer = self.trainer
        device = trainer.strategy.root_device
        problem = None
        if device.type != "cuda":
            problem = f"it needs a CUDA device, and this run trains on {device}"
        elif trainer.world_size > 1:
            problem = f"it runs in one process, and this run has {trainer.world_size} (DDP)"
        elif str(trainer.precision) not in ("32-true", "32", "bf16-mixed", "bf16-true"):
            why = " (fp16 loss scaling decides on the host)" if str(trainer.precision) in ("16-mixed", "16") else ""
            problem = f"it supports precision 32-true, bf16-mixed and bf16-true, not {trainer.precision}{why}"
        elif trainer.accumulate_grad_batches != 1:
            problem = f"it steps the optimizer every batch (accumulate_grad_batches={trainer.accumulate_grad_batches})"
        if problem:
            raise ValueError(f"task.module.cuda_graph=true captures the training step as a CUDA graph: {problem}. "
                             "Set task.module.cuda_graph=false")

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

    def guard_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Note whether ``loss`` is finite on every process, without waiting for the device, and return it.

        :meth:`optimizer_step` reads the note after the backward pass has been queued (it waits for the loss, not
        for the backward pass) and, when the loss was not finite, drops the step on every process before the
        optimizer changes any state, with a warning and a count. Too many non-finite steps in a row raise
        :class:`NonFiniteLossError`.
        """
        finite = torch.isfinite(loss.detach()).all().to(torch.int32)
        if is_distributed():  # every process must skip the same steps
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        self._finite.record(finite, loss)
        return loss

    def _step_is_finite(self) -> bool:
        """Whether the step whose loss :meth:`guard_loss` noted may update the weights (counts and warns if not)."""
        return self._judge_step(self._finite.read(), self.global_step if self._trainer is not None else -1)

    def _judge_step(self, noted: tuple[bool, list[torch.Tensor]] | None, step: int, *, log_count: bool = True) -> bool:
        """Count, warn about and (too many in a row) stop on the step whose flag ``noted`` holds (``log_count``:
        log the count, where Lightning allows logging)."""
        if noted is None or noted[0]:
            self._nonfinite_run = 0
            return True
        losses = torch.stack([p.detach().float().mean() for p in noted[1]])
        bad = losses[~torch.isfinite(losses)]
        loss = bad[0] if len(bad) else losses[-1]  # finite here when another process's loss was not
        self.nonfinite_steps += 1
        self._nonfinite_run += 1
        if log_count:
            self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=1)
        log.warning(
            "non-finite loss (%s) at step %d: step skipped (%d skipped so far, %d in a row)",
            float(loss), step, self.nonfinite_steps, self._nonfinite_run,
        )
        if self._nonfinite_run >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the training loss was NaN/inf for {self._nonfinite_run} steps in a row (up to step {step}): "
                "training stopped. Lower the learning rate (task.module.optimizer.lr), check the data, or train in "
                "full precision (trainer.precision=32-true); task.module.max_nonfinite_steps sets the limit."
            )
        return False

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        def closure():
            result = optimizer_closure()  # forward, backward (queued on the device)
            if not self._step_is_finite():
                raise _SkipUpdate
            return result

        try:
            optimizer.step(closure=closure)
        except _SkipUpdate:
            pass
        return None

    # ------------------------------------------------------------------ the captured training step (cuda_graph)
    #: Names of the values :meth:`graph_losses` returns, the total ``"loss"`` first (logged as ``train/<name>``).
    graph_loss_names: tuple[str, ...] = ("loss",)

    def graph_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The device tensors of ``batch`` that the captured training step reads, with the same shapes every step."""
        raise NotImplementedError(f"{type(self).__name__} does not support task.module.cuda_graph=true")

    def graph_losses(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training losses of :meth:`graph_inputs`' tensors (run eagerly in the warm-up steps, then captured)."""
        raise NotImplementedError(f"{type(self).__name__} does not support task.module.cuda_graph=true")

    def captured_training_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """A training step as one replayed CUDA graph (``cuda_graph=True``): the training_step of manual optimization.

        Counts the optimizer step for Lightning, steps the learning-rate schedule (in place on the device tensor the
        graph reads), logs the losses and notes whether the step was finite (read one step later)."""
        from .captured_step import CapturedStep

        inputs = self.graph_inputs(batch)
        lightning_opt = self.optimizers()
        opt = lightning_opt.optimizer
        if self._captured_step is None:
            # Here, not in configure_optimizers: a resumed run's optimizer state is loaded by now.
            _prepare_for_capture(opt, inputs[0].device)
            self._captured_step = CapturedStep(self._graph_step, warmup=3)
        step = self.global_step
        captured = self._captured_step
        # Parameters whose momentum buffers the fused SGD step creates now: uninitialised when the step is skipped.
        fresh = [] if captured.captured else _without_momentum_buffers(opt)
        # A batch of other shapes than the graph's runs eagerly; so does one that would be captured but does not have
        # the shapes every later batch will have (more boxes than the padded count), so the graph never fixes them.
        odd_shapes = not captured.matches(inputs) or (captured.captures_next and not self.graph_conforms(inputs))
        # Nor is a step captured while the momentum buffers of trained parameters are missing (the warm-up steps were
        # skipped): the graph would fix the fused SGD's first-step rule (buffer = gradient) for every replay. A
        # parameter the optimizer has stepped has an entry in its state (emptied when the step was skipped); its
        # gradient is no sign, as validation sets every gradient to None.
        eager = odd_shapes or (captured.captures_next and any(p in opt.state for p in fresh))
        if odd_shapes and not self._warned_shapes:
            log.warning(
                "a training batch with other shapes than the captured training step takes (%s) runs eagerly; so will "
                "any other such batch (detection: raise task.module.cuda_graph_max_boxes when images have more "
                "objects)", [tuple(t.shape) for t in inputs])
            self._warned_shapes = True
        lightning_opt._on_before_step()  # Lightning's optimizer-step count (what opt.step() would do)
        try:
            capturing = not eager and captured.captures_next
            try:
                values = (captured.run_eagerly(*inputs) if eager else captured(*inputs)).clone()
            except Exception as err:
                if capturing:
                    raise RuntimeError(f"capturing the training step as a CUDA graph failed ({err}); train without it: "
                                       "task.module.cuda_graph=false") from err
                raise
            if fresh and not bool(values[-1]):  # an eager step (before the capture): waiting for it costs little
                for p in fresh:  # the next step creates them again, as a first step
                    opt.state.get(p, {}).pop("momentum_buffer", None)
        finally:
            lightning_opt._on_after_step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        # The flag of the previous step: its kernels ran while this step's were queued, so this does not stall.
        self._judge_step(self._finite.read(), self._unread_step)
        self._finite.record(values[-1].to(torch.int32), values[0])
        self._unread_step = step
        self.log_training({f"train/{n}": values[i] for i, n in enumerate(self.graph_loss_names)}, inputs[0].shape[0])
        return values[0]

    def graph_conforms(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether :meth:`graph_inputs`' tensors have the shapes the captured graph should fix (a batch that does not
        is trained eagerly rather than captured)."""
        return True

    def on_fit_start(self) -> None:
        # A new fit has a new optimizer (and perhaps another device): the graph of an earlier fit must not replay.
        self._reset_captured_step()

    def on_train_epoch_start(self) -> None:
        # The training order follows the trainer's epoch. Lightning sets the sampler's epoch from its count of
        # processed epochs, which is one ahead of it when a run with max_steps resumes from the checkpoint written
        # at an epoch's end: that run would train every later epoch on the next epoch's order.
        sampler = getattr(getattr(self._trainer, "datamodule", None), "train_sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.current_epoch)

    def _reset_captured_step(self) -> None:
        """No captured step yet (made at the first training step of a fit), no flag to read, no shape warning."""
        for name, value in _NO_CAPTURED_STEP.items():
            setattr(self, name, value)

    def _graph_step(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The captured step: losses, backward, clipping, the fused optimizer step (skipped on the device when the
        loss or the gradient norm is not finite); returns the losses and the finite flag as one float vector."""
        opt = self.optimizers().optimizer
        opt.zero_grad(set_to_none=True)  # the backward pass creates the gradients: in the graph's memory
        losses = self.graph_losses(*inputs)
        loss = losses["loss"]
        loss.backward()
        finite = torch.isfinite(loss.detach())
        if self.gradient_clipping is not None:
            value, algorithm = self.gradient_clipping
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            if algorithm == "norm":
                norm = torch.nn.utils.clip_grad_norm_(params, value, foreach=True)
                finite = finite & torch.isfinite(norm)
            else:
                torch.nn.utils.clip_grad_value_(params, value, foreach=True)
        opt.found_inf = (~finite).to(torch.float32).reshape(())  # the fused kernels skip the update when it is 1
        try:
            opt.step()
        finally:
            del opt.found_inf
        values = [losses[name].detach().float() for name in self.graph_loss_names]
        return torch.stack([*values, finite.to(torch.float32)])

    def on_train_end(self) -> None:
        if self.cuda_graph:  # the last captured step's flag; then the graph and its memory go
            self._judge_step(self._finite.read(), self._unread_step, log_count=False)
            self._reset_captured_step()

    def __getstate__(self) -> dict[str, Any]:
        # A copy of the task (the EMA's averaged model, a Predictor) has no captured step: a CUDA graph cannot be
        # copied, and it steps the original's optimizer. The copy captures its own if it trains.
        state = super().__getstate__()
        state.update(_NO_CAPTURED_STEP)
        return state

    def configure_optimizers(self):
        groups = param_groups(self.model, self.weight_decay)
        if self.cuda_graph:
            try:  # one fused kernel per step, and capturable with the learning rate as a device tensor
                opt = self.optimizer_factory(groups, fused=True)
            except (TypeError, RuntimeError) as err:
                raise ValueError(
                    "task.module.cuda_graph=true needs an optimizer with a fused implementation (torch.optim.SGD, "
                    f"Adam or AdamW take fused=True): {err}"
                ) from err
        else:
            opt = self.optimizer_factory(groups)
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
        # The random-number state of every process (stochastic depth draws from torch's global generator), so a
        # resumed run continues with the same draws. Plain lists and tensors: loadable with weights_only=True.
        checkpoint["effdense_rng"] = _gather_rng_states()
        if self.cuda_graph:  # learning rates as plain numbers and no capturable flag, as an eager run stores them
            for state in checkpoint.get("optimizer_states", []):  # (the runtime form of a captured step)
                for group in state.get("param_groups", []):
                    if isinstance(group.get("lr"), torch.Tensor):
                        group["lr"] = float(group["lr"])
                    if group.get("capturable"):
                        group["capturable"] = False
            for state in checkpoint.get("lr_schedulers", []):
                if isinstance(state.get("_last_lr"), list):
                    state["_last_lr"] = [float(v) if isinstance(v, torch.Tensor) else v for v in state["_last_lr"]]
        if self.run_config is not None:
            checkpoint["effdense_config"] = self.run_config
        names = self.class_names()
        if names is not None:
            checkpoint["effdense_class_names"] = names

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _carry_step_count(checkpoint, manual=not self.automatic_optimization)
        states = checkpoint.get("effdense_rng")
        if states:
            rank, _ = rank_and_world()
            if rank < len(states):
                _set_rng_state(states[rank])

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
        from evaluation.coco import atomic_write_json

        metrics = {**self.last_metrics, **({"data": dict(data)} if data is not None else {})}
        atomic_write_json(Path(run_dir) / "metrics.json", _json_safe(metrics), indent=2)


def _precise_bn_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``precise_bn`` with its defaults, checked: unknown keys and bad values are errors naming the setting."""
    defaults = {"enabled": True, "num_batches": 50, "transform": "train"}
    settings = _plain(settings or {})
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"task.module.precise_bn: unknown key(s) {unknown}; it takes {sorted(defaults)}")
    out = {**defaults, **settings}
    if not isinstance(out["enabled"], bool):
        raise TypeError(f"task.module.precise_bn.enabled must be true or false, got {out['enabled']!r}")
    check_settings(num_batches=out["num_batches"], transform=out["transform"])
    return out


def _compiles_cuda_graphs(options: Mapping[str, Any]) -> bool:
    """Whether ``torch.compile`` with these keyword arguments is asked to capture CUDA graphs itself (its
    ``reduce-overhead`` and ``max-autotune`` modes, the inductor option ``triton.cudagraphs``, the ``cudagraphs``
    backend)."""
    if options.get("mode") in ("reduce-overhead", "max-autotune") or options.get("backend") == "cudagraphs":
        return True
    return (options.get("options") or {}).get("triton.cudagraphs") is True


def _without_inductor_cuda_graphs(options: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for a network that a captured training step replays: inductor's own CUDA
    graphs off explicitly (``TORCHINDUCTOR_CUDAGRAPHS=1`` or its config would turn them on in any mode); a mode
    becomes its inductor options (torch.compile takes a mode or options, not both)."""
    if options.get("backend", "inductor") != "inductor":
        return options
    options = dict(options)
    mode = options.pop("mode", None)
    settings = dict(options.get("options") or {})
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        settings = {**list_mode_options(mode), **settings}
    options["options"] = {**settings, "triton.cudagraphs": False}
    return options


def _prepare_for_capture(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Settings of ``optimizer`` that a captured step needs, also when its state came from a run without one: each
    group's learning rate a float32 tensor on ``device`` (the value the graph reads; the schedule fills it in place),
    the fused implementation, ``capturable`` (Adam, AdamW) and the step counters on the parameters' device."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) and lr.device == device):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        if "fused" in group:
            group["fused"] = True
            if "foreach" in group:
                group["foreach"] = None
        if "capturable" in group:
            group["capturable"] = True
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor) and step.device != p.device:
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def _carry_step_count(checkpoint: dict[str, Any], *, manual: bool) -> None:
    """Make the optimizer-step count of a checkpoint that Lightning will restore for this run's kind of optimization
    (manual: the captured step; automatic: the eager loop) that of the whole run, when earlier parts trained the other
    way: Lightning keeps one count per kind, and its global step is the current kind's."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    auto = loops.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer")
    hand = loops.get("epoch_loop.manual_optimization.optim_step_progress")
    if not auto or not hand or "step" not in auto:
        return
    auto_steps, hand_steps = auto["step"]["total"]["completed"], hand["total"]["completed"]
    if manual and hand_steps < auto_steps:
        loops["epoch_loop.manual_optimization.optim_step_progress"] = copy.deepcopy(auto["step"])
    elif not manual and auto_steps < hand_steps:
        auto["step"] = copy.deepcopy(hand)
        for part in ("total", "current"):  # zero_grad runs once per step in the automatic loop
            zero_grad = auto.get("zero_grad", {}).get(part)
            if zero_grad is not None:
                zero_grad.update({key: hand[part]["completed"] for key in ("ready", "started", "completed")})


def _without_momentum_buffers(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters of a momentum optimizer (SGD) that have no momentum buffer yet."""
    return [p for group in optimizer.param_groups if group.get("momentum", 0) for p in group["params"]
            if optimizer.state.get(p, {}).get("momentum_buffer") is None]


def _plain(options: Any) -> dict[str, Any]:
    """A config mapping (``DictConfig`` from Hydra, or a dict) as plain Python containers."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(options, DictConfig):
        return OmegaConf.to_container(options, resolve=True)
    return dict(options)


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


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_rng_states() -> list[dict[str, Any]]:
    """Each process's random state, in rank order (every process calls this while a checkpoint is dumped)."""
    state = _rng_state()
    if not is_distributed():
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states
