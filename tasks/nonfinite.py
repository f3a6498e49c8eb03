"""The non-finite loss guard: a training step whose loss is NaN or infinite is skipped, counted and warned about,
and too many in a row stop training (:class:`NonFiniteLossError`). The loss is checked on the device and read on
the host only once the backward pass is queued, so the guard does not stall the step."""

from __future__ import annotations

import logging

import torch

from utils.distributed import is_distributed

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss kept being NaN or infinite."""


class _SkipUpdate(Exception):
    """Raised after the backward pass of a skipped step, before the optimizer changes anything."""


class _DeviceFlag:
    """A flag computed on the device, read on the host later without waiting for work queued after it.

    On CUDA the flag is copied into pinned memory behind the work queued so far, with an event, so a read waits
    for that point of the stream only (not for the backward pass). Flags recorded before one read (gradient
    accumulation) combine: the read is true only if all were."""

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


class NonFiniteGuard:
    """The guard's part of :class:`tasks.base.DenseTask` (a LightningModule): :meth:`guard_loss` notes a step's
    loss, :meth:`optimizer_step` drops the update of a step whose loss was not finite."""

    def _setup_nonfinite_guard(self, max_nonfinite_steps: int) -> None:
        """Called from the task's ``__init__``: no step skipped yet; ``max_nonfinite_steps`` in a row stop training."""
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        #: Steps skipped because of a non-finite loss (in total, and in a row).
        self.nonfinite_steps = 0
        self._nonfinite_run = 0
        self._finite = _DeviceFlag()

    def guard_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Note whether ``loss`` is finite on every process, without waiting for the device, and return it.

        :meth:`optimizer_step` reads the note after the backward pass has been queued and, when the loss was not
        finite, drops the step on every process before the optimizer changes any state.
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
