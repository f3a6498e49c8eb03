"""The captured training step of a task (``task.module.cuda_graph=true``): the whole step, optimizer included, run
as one CUDA graph (:class:`tasks.captured_step.CapturedStep`) under Lightning's manual optimization, and what it
needs around it: the setup checks, the fused optimizer, checkpoints that an eager run can resume and the reverse.
docs/training.md, "The captured training step", describes its use and limits."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = ["CapturedTraining", "carry_step_count", "store_as_eager"]

log = logging.getLogger(__name__)

#: The captured-step state of a task that has none yet: the step (made at the first training step of a fit), the
#: step whose finite flag is still to be read (captured steps), whether the shape warning was given.
_NO_CAPTURED_STEP: dict[str, Any] = {"_captured_step": None, "_unread_step": -1, "_warned_shapes": False}


class CapturedTraining:
    """The captured step's part of :class:`tasks.base.DenseTask` (a LightningModule with
    :class:`tasks.nonfinite.NonFiniteGuard`, whose flag the step's finite check goes through). Tasks that support
    it implement :meth:`graph_inputs` and :meth:`graph_losses` and call :meth:`captured_training_step`."""

    #: Names of the values :meth:`graph_losses` returns, the total ``"loss"`` first (logged as ``train/<name>``).
    graph_loss_names: tuple[str, ...] = ("loss",)

    def _setup_captured_training(self, cuda_graph: bool) -> None:
        """Called from the task's ``__init__``."""
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be true or false, got {cuda_graph!r}")
        #: Whether the training step runs as one captured CUDA graph.
        self.cuda_graph = cuda_graph
        if cuda_graph:  # the task steps the optimizer itself: the whole step is one graph
            self.automatic_optimization = False
        #: The captured step's gradient clipping, ``(max value, "norm" | "value")``, or ``None``.
        self.gradient_clipping: tuple[float, str] | None = None
        self._reset_captured_step()

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

    def graph_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The device tensors of ``batch`` that the captured training step reads, with the same shapes every step."""
        raise NotImplementedError(f"{type(self).__name__} does not support task.module.cuda_graph=true")

    def graph_losses(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training losses of :meth:`graph_inputs`' tensors (run eagerly in the warm-up steps, then captured)."""
        raise NotImplementedError(f"{type(self).__name__} does not support task.module.cuda_graph=true")

    def graph_conforms(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether :meth:`graph_inputs`' tensors have the shapes the captured graph should fix (a batch that does not
        is trained eagerly rather than captured)."""
        return True

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

    def on_fit_start(self) -> None:
        # A new fit has a new optimizer (and perhaps another device): the graph of an earlier fit must not replay.
        self._reset_captured_step()

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

    def _reset_captured_step(self) -> None:
        """No captured step yet (made at the first training step of a fit), no flag to read, no shape warning."""
        for name, value in _NO_CAPTURED_STEP.items():
            setattr(self, name, value)

    def _make_optimizer(
        self, factory: Callable[..., torch.optim.Optimizer], groups: Iterable
    ) -> torch.optim.Optimizer:
        """``factory(groups)``; with the captured step, its fused implementation (one kernel per step, capturable
        with the learning rate as a device tensor)."""
        if not self.cuda_graph:
            return factory(groups)
        try:
            return factory(groups, fused=True)
        except (TypeError, RuntimeError) as err:
            raise ValueError(
                "task.module.cuda_graph=true needs an optimizer with a fused implementation (torch.optim.SGD, "
                f"Adam or AdamW take fused=True): {err}"
            ) from err


def store_as_eager(checkpoint: dict[str, Any]) -> None:
    """Write a captured step's optimizer and schedule state in ``checkpoint`` as an eager run stores it: learning
    rates as plain numbers, no ``capturable`` flag."""
    for state in checkpoint.get("optimizer_states", []):
        for group in state.get("param_groups", []):
            if isinstance(group.get("lr"), torch.Tensor):
                group["lr"] = float(group["lr"])
            if group.get("capturable"):
                group["capturable"] = False
    for state in checkpoint.get("lr_schedulers", []):
        if isinstance(state.get("_last_lr"), list):
            state["_last_lr"] = [float(v) if isinstance(v, torch.Tensor) else v for v in state["_last_lr"]]


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


def carry_step_count(checkpoint: dict[str, Any], *, manual: bool) -> None:
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
