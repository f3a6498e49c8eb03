"""What the measures of one benchmark run share: the models, device, sizes, batches, inputs, and the rows made."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from benchmarks.effdet_ref import EffdetReference
from benchmarks.options import train_boxes
from benchmarks.timing import rss_mb
from benchmarks.train_step import train_inputs
from inference.fast_paths import FastPaths

__all__ = ["RunContext"]


@dataclass
class RunContext:
    """One run's state, built by :func:`benchmarks.harness.run_benchmark` and handed to each measure in turn.

    ``paths`` are this project's fast paths, ``theirs`` effdet's (see :func:`benchmarks.options.effdet_paths`);
    ``common`` holds the fields every model row repeats. The random input batches are made once, here."""

    cfg: DictConfig
    task: Any  #: the configured task (its ``model`` is the network measured)
    ref: EffdetReference | None  #: effdet's equivalent model with ``compare=effdet``
    paths: FastPaths
    theirs: FastPaths
    device: torch.device
    size: tuple[int, int]  #: the input size of prediction
    train_size: tuple[int, int]  #: the input size of the training measures
    batch: int
    train_batch: int
    common: dict[str, Any]
    emit: Callable[[dict], None]
    rows: list[dict] = field(default_factory=list)
    images: torch.Tensor = field(init=False)  #: ``batch`` random images at ``size`` on the device
    #: one training batch at ``train_size``, made when a measure trains: ``(images, boxes, labels)`` for detection,
    #: ``(images, masks)`` for segmentation
    train_inputs: tuple[torch.Tensor, ...] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.cfg.seed)
        self.images = torch.randn(self.batch, 3, *self.size, generator=g).to(self.device)
        if {"ops", "train"} & set(self.measures) or self.effdet_step_for_fit:
            self.train_inputs = train_inputs(self.cfg.task.name, self.images, self.train_batch, self.train_size,
                                             self.task.num_classes, self.cfg.seed, train_boxes(self.cfg))

    @property
    def measures(self) -> list[str]:
        return list(self.cfg.measures)

    @property
    def effdet_step_for_fit(self) -> bool:
        """Whether ``fit`` needs effdet's bare training step timed for its ratio (``train`` would time it)."""
        return self.ref is not None and "fit" in self.measures and "train" not in self.measures

    @property
    def timing(self) -> dict[str, Any]:
        """The keyword arguments of :func:`benchmarks.timing.time_rounds`."""
        cfg = self.cfg
        return {"device": self.device, "warmup": int(cfg.warmup), "iters": int(cfg.iters), "rounds": int(cfg.rounds)}

    @property
    def train_fields(self) -> dict[str, Any]:
        """The training measures' rows say their input's size."""
        return {"image_size": list(self.train_size)}

    def add(self, measure: str, impl: str, **fields) -> None:
        """Make a row of ``measure`` for ``impl`` (effdense or effdet), keep it and pass it to ``emit``."""
        row = {"measure": measure, "impl": impl, **self.common, **fields}
        self.rows.append(row)
        self.emit(row)

    def add_pair(self, measure: str, times: dict, per_call_images: int, *, unit: str, ours: dict | None = None,
                 **fields) -> None:
        """Rows of timed calls (:func:`benchmarks.timing.time_rounds`' result), one per implementation, in ``unit``
        (images/s or ms); this project's row gets the ``ratio`` of the times and the fields ``ours``."""
        ours = ours or {}
        both = "effdet" in times and "effdense" in times
        ratio = round(times["effdense"]["seconds"] / times["effdet"]["seconds"], 3) if both else None
        for impl, t in times.items():
            value = per_call_images / t["seconds"] if unit == "images/s" else t["seconds"] * 1000
            extra = {"ratio": ratio} if impl == "effdense" and ratio is not None else {}
            if impl == "effdense":
                extra.update(ours)
            else:  # effdet's model as it comes: compiled or not as effdet_compile says, BatchNorm never folded
                extra.update(compile=self.theirs.compile, fold_bn=False)
            self.add(measure, impl, value=round(value, 2), unit=unit, ms_per_call=round(t["seconds"] * 1000, 3),
                     spread=round(t["spread"], 3), peak_memory_mb=t["peak_memory_mb"] or rss_mb(self.device),
                     **fields, **extra)
