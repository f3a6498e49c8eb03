"""The ``data`` measure: images/s of the training loader with each number of workers (no model involved)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from benchmarks.options import BenchmarkError

__all__ = ["data_rows"]


def data_rows(cfg: DictConfig, emit: Callable[[dict], None]) -> list[dict]:
    """Training-loader throughput: the batches ready before the first one is taken (worker start-up, each worker's
    prefetched batches) are not timed."""
    from hydra.utils import instantiate

    rows = []
    for workers in cfg.data_workers:
        data_cfg = OmegaConf.merge(cfg.data, {"num_workers": int(workers)})
        dm = instantiate(data_cfg)
        dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()
        # Untimed: the workers' start and the batches they prepare meanwhile (each worker fills up to
        # prefetch_factor before the first is taken); timing from the first batch would count those as fast ones.
        ahead = int(workers) * loader.prefetch_factor if int(workers) > 0 else 1
        batches = min(len(loader) - ahead, int(cfg.data_batches))
        if batches < 1:
            raise BenchmarkError(f"measure 'data' with {workers} workers needs at least {ahead + 1} training batches "
                                 f"({ahead} untimed), {cfg.data.root} has {len(loader)}")
        it = iter(loader)
        for _ in range(ahead):
            next(it)
        start, images = time.perf_counter(), 0
        for _ in range(batches):
            images += next(it)["images"].shape[0]
        rate = images / (time.perf_counter() - start)
        size = cfg.data.get("image_size") or cfg.data.get("crop_size")  # segmentation: the [H, W] crop
        row = {"measure": "data", "impl": "effdense", "task": cfg.task.name, "data": str(cfg.data.root),
               "image_size": OmegaConf.to_container(size) if OmegaConf.is_config(size) else size,
               "batch": int(cfg.data.batch_size),
               "workers": int(workers), "value": round(rate, 1), "unit": "images/s",
               "per_worker": round(rate / max(int(workers), 1), 1), "cpu_count": os.cpu_count()}
        cache = cfg.data.get("decoded_cache")
        if cache:  # segmentation: the decoded frames' folder (a first run fills it while it is measured)
            row["decoded_cache"] = str(cache)
        rows.append(row)
        emit(row)
        del it, loader
    return rows
