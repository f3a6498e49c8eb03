"""The ``fit`` measure's timing: the Lightning training loop of ``tools/train.py`` on one in-memory batch."""

from __future__ import annotations

import copy
import statistics
import time

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from benchmarks.ops import OpCount, OpCounter
from benchmarks.options import BenchmarkError, train_boxes
from benchmarks.timing import peak_mb, print_profile, start_profiler, sync
from benchmarks.train_step import random_masks, random_targets
from inference.fast_paths import FastPaths

__all__ = ["time_fit"]


def time_fit(cfg: DictConfig, task, paths: FastPaths, device: torch.device, batch: int, size: tuple[int, int]
             ) -> dict:
    """Run ``warmup + iters * rounds + 1`` steps of a Lightning fit, time ``rounds`` blocks of ``iters`` steps
    after the warm-up and count the operations of one step; the fields of the ``fit`` row (see :mod:`benchmarks`)."""
    import tempfile

    from lightning.pytorch.loggers import CSVLogger

    from tasks.runner import build_task, loop_callbacks, trainer_kwargs

    graph = bool(cfg.task.module.get("cuda_graph", False))  # CUDA only (checked by run_benchmark)
    warmup = max(int(cfg.warmup), 3)  # the counted step (warmup - 2) comes after the first, which creates state
    if graph:  # three eager steps, the capture, one replay counted, then the timed replays
        warmup = max(warmup, 6)
    iters, rounds = int(cfg.iters), int(cfg.rounds)
    profile_steps = 3 if cfg.profile else 0
    # One more step ends the last timed block (blocks run start to start); profiled steps follow.
    steps = warmup + iters * rounds + 1 + (profile_steps + 1 if profile_steps else 0)
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[paths.precision]
    fit_cfg = OmegaConf.merge(cfg, {"task": {"module": {"channels_last": paths.channels_last,
                                                        "compile": bool(paths.compile)}}})
    fit_task = build_task(fit_cfg, copy.deepcopy(task.model).train())
    g = torch.Generator().manual_seed(int(cfg.seed))
    data: dict[str, torch.Tensor] = {"images": torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=g)}
    if cfg.task.name == "detection":
        data["boxes"], data["labels"] = random_targets(batch, size, fit_task.num_classes, per_image=train_boxes(cfg),
                                                       device="cpu", seed=int(cfg.seed))
    else:
        data["masks"] = random_masks(batch, size, int(cfg.data.num_classes), int(cfg.seed))
    if device.type == "cuda":
        data = {k: v.pin_memory() for k, v in data.items()}
    # A replayed graph allocates nothing: its memory was taken while capturing, so the captured step's peak is
    # that of the whole fit (warm-up steps and capture), not of the timed steps.
    timer = _FitTimer(device, count_at=warmup - 2, start_at=warmup, iters=iters, rounds=rounds,
                      profile_steps=profile_steps, reset_peak_at_start=not graph)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    class SameBatch(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return steps

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return data

    with tempfile.TemporaryDirectory(prefix="effdense_fit_") as tmp:
        callbacks = loop_callbacks(fit_cfg)  # those of tools/train.py, without checkpointing
        kwargs = trainer_kwargs(fit_cfg, training=True)
        kwargs.update(accelerator="gpu" if device.type == "cuda" else "cpu",
                      devices=[device.index or 0] if device.type == "cuda" else 1, strategy="auto",
                      precision=precision, max_steps=steps, max_epochs=1, limit_val_batches=0,
                      num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, fast_dev_run=False)
        trainer = L.Trainer(**kwargs, callbacks=[*callbacks, timer], default_root_dir=tmp,
                            logger=CSVLogger(save_dir=tmp, name="logs", version=""))
        loader = torch.utils.data.DataLoader(SameBatch(), batch_size=None, shuffle=False, num_workers=0)
        trainer.fit(fit_task, train_dataloaders=loader)
    seconds, spread = timer.seconds()
    # torch.compile'd code does not run under the counting dispatch mode: with compilation the count would be the
    # eager step's, so none is reported.
    counted = not fit_cfg.task.module.compile
    return {"value": round(batch / seconds, 2), "unit": "images/s", "ms_per_call": round(seconds * 1000, 3),
            "spread": round(spread, 3), "operations": timer.count.operations if counted else None,
            "host_syncs": timer.count.host_syncs if counted else None,
            "ema": bool(fit_cfg.ema.enabled), "cuda_graph": graph,
            "gradient_clip_val": fit_task.gradient_clipping[0] if graph and fit_task.gradient_clipping
            else kwargs.get("gradient_clip_val"),
            "lightning_precision": precision, "peak_memory_mb": peak_mb(device)}


class _FitTimer(L.Callback):
    """Counts the operations of step ``count_at`` (from its start to the next step's start, so the optimizer, the
    EMA update and logging are in it; eager: compiled code does not run under the counter), then times ``rounds``
    blocks of ``iters`` steps from step ``start_at``."""

    def __init__(self, device: torch.device, *, count_at: int, start_at: int, iters: int, rounds: int,
                 profile_steps: int = 0, reset_peak_at_start: bool = True) -> None:
        self.device, self.count_at, self.start_at, self.iters, self.rounds = device, count_at, start_at, iters, rounds
        self.reset_peak_at_start = reset_peak_at_start
        self.counter = None
        self.count = OpCount(0, 0)
        self.marks: list[float] = []  # the start of each block and the end of the last
        #: with ``profile_steps``, that many whole steps after the last timed one run under torch.profiler
        self.profile_at = start_at + iters * rounds + 1 if profile_steps else None
        self.profile_steps = profile_steps
        self.profiler = None

    def _mark(self) -> None:
        sync(self.device)
        self.marks.append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.count_at + 1 and self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.count = self.counter.result()
            self.counter = None
        if batch_idx == self.count_at:
            self.counter = OpCounter()
            self.counter.__enter__()
        if batch_idx == self.start_at and self.device.type == "cuda" and self.reset_peak_at_start:
            torch.cuda.reset_peak_memory_stats(self.device)
        # Blocks run from a step's start to a later step's start (one more step follows the last block), so each
        # holds whole steps: the batch's copy to the device, the step, the callbacks (the EMA update), logging.
        if self.start_at <= batch_idx <= self.start_at + self.iters * self.rounds and (
            batch_idx - self.start_at
        ) % self.iters == 0:
            self._mark()
        if self.profile_at is not None and batch_idx == self.profile_at:
            self.profiler = start_profiler(self.device)
        if self.profile_at is not None and batch_idx == self.profile_at + self.profile_steps:
            print_profile(self.profiler, self.device, f"fit, {self.profile_steps} Lightning steps")
            self.profiler = None

    def seconds(self) -> tuple[float, float]:
        """The median block's seconds per step, and the blocks' spread."""
        blocks = [(b - a) / self.iters for a, b in zip(self.marks, self.marks[1:])]
        if len(blocks) != self.rounds:
            raise BenchmarkError(f"measure 'fit' timed {len(blocks)} blocks of steps, expected {self.rounds}")
        return statistics.median(blocks), (max(blocks) - min(blocks)) / min(blocks)
