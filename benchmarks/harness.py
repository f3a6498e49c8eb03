"""The benchmark's entry, :func:`run_benchmark`: the request checked, the models built, the measures run in turn
(what each reports: :mod:`benchmarks`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from benchmarks.calibration import calibrate_bn, calibration_images
from benchmarks.context import RunContext
from benchmarks.data_measure import data_rows
from benchmarks.effdet_ref import EffdetReference
from benchmarks.measures import MEASURES
from benchmarks.options import (
    BenchmarkError,
    batch_sizes,
    effdet_paths,
    image_size,
    int_option,
    resolve_device,
    train_boxes,
    train_image_size,
)
from benchmarks.report import device_name, size_text
from inference.fast_paths import FastPaths

__all__ = ["run_benchmark"]


def _check_request(cfg: DictConfig) -> None:
    """Errors in the request that need no model, reported before anything is built."""
    unknown = [m for m in cfg.measures if m not in MEASURES]
    if unknown:
        raise BenchmarkError(f"unknown measures {unknown}; choose from {list(MEASURES)}")
    compare = cfg.compare
    if compare not in (None, "effdet"):
        raise BenchmarkError(f"compare must be null or effdet, got {compare!r}")
    task_name = cfg.task.name
    if task_name == "detection":
        train_boxes(cfg)
    if compare and task_name != "detection":
        raise BenchmarkError("compare=effdet is for task=detection (effdet has no segmentation model)")
    if cfg.effdet_checkpoint and not compare:
        raise BenchmarkError(f"effdet_checkpoint={cfg.effdet_checkpoint} is loaded through effdet's model: it needs "
                             "compare=effdet")
    for name, least in (("iters", 1), ("rounds", 1), ("warmup", 0)):
        int_option(cfg, name, least)


def run_benchmark(cfg: DictConfig, emit: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Run the measurements of ``cfg`` (configs/benchmark.yaml); ``emit`` sees each row as it is made."""
    from tasks.runner import build_model, build_task

    _check_request(cfg)
    compare, task_name = cfg.compare, cfg.task.name
    device = resolve_device(cfg.device)
    # Measures that need CUDA fail here, before anything is measured, not after the others ran.
    if device.type != "cuda" and "fit" in cfg.measures and cfg.task.module.get("cuda_graph", False):
        raise BenchmarkError("task.module.cuda_graph=true (the captured training step) needs device=cuda")
    ort = [m for m in cfg.measures if m.startswith("latency_ort")]
    if ort and device.type != "cpu":
        raise BenchmarkError(f"{', '.join(ort)} time ONNX Runtime on the CPU against PyTorch on the same device: "
                             "use device=cpu")
    torch.set_flush_denormal(True)  # as training and evaluation run: denormals make CPU timings erratic
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = bool(cfg.get("cudnn_benchmark", True))
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    size = image_size(cfg, task_name)
    train_size = train_image_size(cfg, task_name, size)
    if list(cfg.measures) == ["data"]:
        return data_rows(cfg, emit)
    training = {"ops", "train", "fit"} & set(cfg.measures)
    if compare and train_size != size and training:
        raise BenchmarkError(f"compare=effdet builds effdet's model for image_size {size[0]}x{size[1]}: its "
                             f"training measures run at that size too, so train_image_size "
                             f"{train_size[0]}x{train_size[1]} cannot be compared; leave it unset")
    task = build_task(cfg, build_model(cfg)).eval()
    calibrate = bool(cfg.calibrate_bn) and not (compare and cfg.effdet_checkpoint)  # a checkpoint's are kept

    def calibrated(model: torch.nn.Module) -> None:  # random weights: BatchNorm statistics of one training pass
        if calibrate:
            g = torch.Generator().manual_seed(cfg.seed)
            calibrate_bn(model, torch.randn(calibration_images(size), 3, *size, generator=g), device)

    ref = EffdetReference(cfg, task, size, calibrated) if compare else None
    if ref is None:
        calibrated(task.model)
    paths = FastPaths(**OmegaConf.to_container(cfg.fast)).resolve(device)
    theirs = effdet_paths(cfg, paths)
    batch, train_batch = batch_sizes(cfg, device, task_name)
    if train_batch == 1 and training:
        stride = max(spec.stride for spec in task.model.out_specs.values())
        if all(-(-side // stride) == 1 for side in train_size):
            raise BenchmarkError(
                f"train_batch_size=1 at {size_text(train_size)}: the coarsest feature map (stride {stride}) is 1x1, "
                "where BatchNorm cannot train on one value per channel; use train_batch_size >= 2 or a "
                f"train_image_size above {stride}")

    common = {
        "task": task_name, "backbone": cfg.backbone.name, "scale": cfg.scale, "device": device_name(device),
        "image_size": list(size), "precision": paths.precision, "channels_last": paths.channels_last,
        "compile": paths.compile, "cudagraphs": paths.cudagraphs, "fold_bn": paths.fold_bn,
        "calibrated_bn": calibrate,
    }
    run = RunContext(cfg=cfg, task=task, ref=ref, paths=paths, theirs=theirs, device=device,
                     size=size, train_size=train_size, batch=batch, train_batch=train_batch, common=common, emit=emit)
    for name, measure in MEASURES.items():
        if name in run.measures:
            measure(run)
    return run.rows
