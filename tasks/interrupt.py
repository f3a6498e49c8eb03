"""Stopping a run on Ctrl-C or SIGTERM (preemption) with a checkpoint of the step reached and the command that
resumes it."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from utils.distributed import is_distributed

__all__ = ["StopOnSignal"]

log = logging.getLogger(__name__)


class StopOnSignal(Checkpoint):
    """On the first Ctrl-C (SIGINT) or a SIGTERM, training stops at the end of the current step: ``last.ckpt`` is
    written there, as a step-interval checkpoint would be (so the resumed run repeats the uninterrupted one), and
    ``resume_command`` is printed. A second Ctrl-C stops at once, without a checkpoint.

    The stop comes at the end of an optimizer step (not inside a gradient-accumulation window); a signal during
    validation takes effect at the next step. Lightning's own SIGTERM handling (which would end the run with status 0
    at its next check, without a checkpoint) is not called. Under DDP the processes agree at every step whether one
    of them was signalled (one small all-reduce), so all stop after the same step. A
    :class:`~lightning.pytorch.callbacks.Checkpoint`: Lightning runs it after the other callbacks'
    ``on_train_batch_end`` (the step's EMA update is in the checkpoint).
    """

    def __init__(self, dirpath: str | Path, resume_command: str) -> None:
        self.dirpath = Path(dirpath)
        self.resume_command = resume_command
        #: The signal received (``signal.SIGINT`` / ``SIGTERM``), or ``None``.
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._checked_step: int | None = None

    def _handle(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if signum == signal.SIGINT and rank_zero_only.rank == 0:
            print("\nstopping after this step (Ctrl-C again to stop at once, without a checkpoint)", file=sys.stderr,
                  flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        self._checked_step = trainer.global_step
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the signals as they are
                return

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            last = self.dirpath / "last.ckpt"
            where = f"the last checkpoint is {last}" if last.is_file() else "no checkpoint was written"
            print(f"stopped at once, in step {trainer.global_step + 1}: {where}; resume with: {self.resume_command}",
                  file=sys.stderr, flush=True)

    def _signalled(self) -> bool:
        flag = self.received is not None
        if is_distributed():
            import torch.distributed as dist

            t = torch.tensor([int(self.received or 0)], device=torch.device("cpu") if dist.get_backend() == "gloo"
                             else torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            self.received = self.received or (int(t.item()) or None)
        return flag

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._checked_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._checked_step = trainer.global_step
        if not self._signalled():
            return
        if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
            return  # the last step: training ends now and its own checkpoint is written
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(str(path))
        self._restore()
        name = "Ctrl-C" if self.received == signal.SIGINT else "SIGTERM"
        if trainer.is_global_zero:
            print(f"stopped by {name} after step {trainer.global_step}: {path} written; resume with: "
                  f"{self.resume_command}", file=sys.stderr, flush=True)
        raise SIGTERMException(130 if self.received == signal.SIGINT else 143)
