"""Speed and size of a configured model, optionally side by side with effdet's equivalent model.

``python tools/benchmark.py task=detection backbone=b0 device=cuda compare=effdet`` (see configs/benchmark.yaml)
prints one JSON line per measurement and a table. Measurements:

- ``params``: parameter count; ``flops``: multiply-adds x 2 of one forward pass of one image
  (``torch.utils.flop_counter``: convolutions and matrix products);
- ``agreement`` (with ``compare=effdet``): effdet's randomly initialised (or ``effdet_checkpoint``) weights are
  converted into this project's model and both predict the same float32 input; the line gives the largest
  class-logit difference and how many detections agree;
- ``predict``: images/s at ``batch_size``, model + decoding + NMS, with the fast paths (``fast.*``);
- ``latency``: milliseconds for one image, the same pipeline;
- ``data``: images/s of the training data pipeline (read, decode, augment at the model resolution or, for
  segmentation, the training crop, collate
  into uint8 batches; normalisation happens on the device) with each of ``data_workers`` loader workers, and
  per worker (use ``data=synthetic`` or your own data; no model is involved);
- ``train``: images/s of a training step at ``train_batch_size`` (forward, target assignment, loss, backward,
  SGD step; detection with ``train_boxes`` random boxes per image; segmentation: forward, the task's loss on label-sized logits, backward, SGD step), with bf16 autocast /
  channels-last / compilation as configured (norms are not folded in training). The training measures (``train``,
  ``fit`` and the step of ``ops``) run at ``train_image_size``: by default the size training runs
  at, the model's resolution for detection and the training crop (``data.crop_size``) for segmentation, or
  ``image_size`` when that is given;
- ``ops`` (any device, eager): tensor operations dispatched by one predict call (at ``batch_size``) and by one
  training step (at ``train_batch_size``), forward and backward, views and allocations not counted, and how many of
  them synchronise with the host. On a GPU each operation is at least one kernel launch, so where the CPU cannot
  launch as fast as the GPU computes (small maps, fast GPUs) these counts, not FLOPs, set the step time;
- ``fit``: images/s of the Lightning training loop that ``tools/train.py`` runs (the task's training step with
  its optimizer and learning-rate schedule, gradient clipping, the EMA of the weights, logging) at
  ``train_batch_size``, on one in-memory batch moved to the device every step (the ``data`` measure covers the
  loader), and the operations and host synchronisations of one whole step; ``vs_train`` is its time over the
  bare ``train`` step's when both are measured (the loop's overhead), and ``ratio`` its time over effdet's bare
  ``train`` step's (effdet has no trainer; with ``compare=effdet`` and ``fit`` but not ``train``, effdet's step is measured alone for it, so this project's network is not compiled a second
  time for a bare step); ``task.module.compile`` follows ``fast.compile``, and
  ``task.module.cuda_graph=true`` measures the loop with the captured training step (CUDA only; with
  ``fast.compile`` on, the step captures the compiled network);

Both implementations run in the same process on the same input, batch and precision, alternating in
``rounds`` so that a machine's drift hits both; ``ratio`` is this project's time over effdet's (below 1 is
faster). effdet gets the generic paths that apply to it too (channels-last, autocast, torch.compile of its
network; its own post-processing and anchor labeller as they are).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import pickle
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from heads import flatten_levels
from inference.fast_paths import CapturedCall, FastPaths, FlatDetector, compile_module, prepare_predictor

__all__ = ["BenchmarkError", "calibrate_bn", "format_table", "run_benchmark"]


class BenchmarkError(ValueError):
    """A benchmark request that cannot be carried out (unknown measure, no effdet equivalent, no CUDA)."""


MEASURES = ("params", "flops", "agreement", "ops", "predict", "latency", "train", "fit", "data")


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_rounds(
    fns: dict[str, Callable[[], Any]], *, device: torch.device, warmup: int, iters: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Seconds per call of each function: ``warmup`` calls each, then ``rounds`` alternating blocks of ``iters``
    calls; the median block mean is reported, with the peak memory of the blocks."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        _sync(device)
    blocks: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, int] = dict.fromkeys(fns, 0)
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            blocks[name].append((time.perf_counter() - start) / iters)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
    out = {}
    for name, times in blocks.items():
        out[name] = {"seconds": statistics.median(times), "spread": (max(times) - min(times)) / min(times)}
        out[name]["peak_memory_mb"] = round(peaks[name] / 2**20, 1) if device.type == "cuda" else None
    return out


# ----------------------------------------------------------------------------------------------- effdet
def effdet_variant_for(cfg: DictConfig) -> str:
    """effdet's name of the configured model (``backbone=b0`` -> ``efficientdet_d0``, ``tf_b0`` -> ``tf_..``)."""
    from models.effdet_convert import EFFDET_VARIANTS

    prefix = "tf_efficientdet" if cfg.padding == "same" else "efficientdet"
    name = f"{prefix}_{cfg.scale}"
    if name not in EFFDET_VARIANTS:
        known = sorted(EFFDET_VARIANTS)
        raise BenchmarkError(f"compare=effdet: effdet has no {name} this project converts; use one of {known}")
    return name


class _Effdet:
    """effdet's model for the configured detector, with this project's model loaded with the same weights."""

    def __init__(self, cfg: DictConfig, task, size: tuple[int, int], calibrate: Callable[[torch.nn.Module], None]
                 ) -> None:
        try:
            import effdet
        except ImportError as err:
            raise BenchmarkError("compare=effdet needs effdet: pip install -e '.[bench]'") from err
        from backbones.timm_backbone import WeightsMismatchError
        from models.effdet_convert import convert_effdet_state_dict

        self.effdet = effdet
        self.name = effdet_variant_for(cfg)
        num_classes = task.num_classes
        self.model = effdet.create_model(
            self.name, pretrained=False, pretrained_backbone=False, num_classes=num_classes, image_size=size
        ).eval()
        if cfg.effdet_checkpoint:
            path = cfg.effdet_checkpoint
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
                raise BenchmarkError(f"effdet_checkpoint={path}: cannot be read as a state dict: {err}") from None
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise BenchmarkError(f"effdet_checkpoint={path}: holds a {type(state).__name__}, not a state dict")
            try:
                self.model.load_state_dict(state)
            except RuntimeError as err:
                first = str(err).strip().splitlines()
                raise BenchmarkError(
                    f"effdet_checkpoint={path} is not a state dict of effdet's {self.name} with {num_classes} classes "
                    f"(the model configured here: backbone={cfg.backbone.name}, data.num_classes): "
                    f"{' '.join(line.strip() for line in first[:3])}"
                ) from None
        else:
            calibrate(self.model)  # before the conversion: both models get the same statistics
        try:
            converted = convert_effdet_state_dict(self.model.state_dict(), variant=self.name, num_classes=num_classes)
            task.model.load_state_dict(converted)
        except (WeightsMismatchError, RuntimeError) as err:
            raise BenchmarkError(f"compare=effdet: the configured model is not effdet's {self.name}: {err}") from None

    def predictor(self, paths: FastPaths, device: torch.device, size: tuple[int, int]):
        model = _working_copy(self.model, paths, device, train=False)
        bench = self.effdet.DetBenchPredict(model).to(device).eval()
        if paths.compile:  # torch's CUDA graphs of the compiled network when paths.cudagraphs
            bench.model = compile_module(model, paths)
        graphed = not paths.compile and paths.cudagraphs and device.type == "cuda"
        if graphed:  # the eager network as a CUDA graph (its NMS waits for the host: only the network is captured)
            bench.model = _GraphedModule(model)
        h, w = size
        infos: dict[int, dict[str, torch.Tensor]] = {}  # per batch size, made once (a host-to-device copy waits)

        @torch.inference_mode()
        def predict(images: torch.Tensor):
            b = images.shape[0]
            if paths.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if paths.compile and paths.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            if b not in infos:
                infos[b] = {"img_scale": torch.ones(b, device=device),
                            "img_size": torch.tensor([[w, h]] * b, device=device)}
            info = infos[b]
            with paths.autocast(device, cache_enabled=not graphed):  # cache off when a graph may be captured
                return bench(images, img_info=info)

        return predict

    def trainer(self, paths: FastPaths, device: torch.device):
        model = _working_copy(self.model, paths, device, train=True)
        bench = self.effdet.DetBenchTrain(model, create_labeler=True).to(device)
        bench.model = compile_module(model, paths, training=True)
        return bench, model


# ----------------------------------------------------------------------------------------------- pieces
class _GraphedModule(torch.nn.Module):
    """``module`` called through :class:`inference.fast_paths.CapturedCall` (a module, so it can stand in for one)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = module
        self._call = CapturedCall(module)

    def forward(self, x: torch.Tensor):
        return self._call(x)


def _working_copy(model: torch.nn.Module, paths: FastPaths, device: torch.device, *, train: bool) -> torch.nn.Module:
    """A copy of ``model`` on ``device`` in train or eval mode, channels-last when asked (norms not folded)."""
    model = copy.deepcopy(model).to(device).train(train)
    return model.to(memory_format=torch.channels_last) if paths.channels_last else model


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, x: torch.Tensor, device: torch.device | str = "cpu") -> None:
    """Sets every BatchNorm's running statistics to those of one training-mode forward pass over ``x`` (on
    ``device``, in float32; the model is left where it was, in the mode it was in).

    A randomly initialised network normalises with identity statistics (mean 0, variance 1), and its activations
    shrink layer by layer: at D0 and D3 the class logits come out constant or nearly so, every score ties, and
    detections, their agreement between two implementations and the work of post-processing (NMS over tied
    boxes) are all untypical. With the statistics of real activations the logits spread as a trained model's do.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    training = model.training
    place = next(model.parameters()).device
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one pass, that pass's statistics
        model.to(device).train()
        model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(training).to(place)


def _calibration_images(size: tuple[int, int], values: int = 64) -> int:
    """How many images :func:`calibrate_bn` needs for ``values`` positions per channel on the coarsest level (P7,
    1/128 of the input): 2 from 896 px (D3) up, 4 at 512 px, 64 at 128 px (a 1x1 map: with 2 images every
    normalised value there would be +-1, and the logits grow to +-40, where scores saturate and tie)."""
    coarsest = -(-size[0] // 128) * -(-size[1] // 128)
    return max(2, -(-values // coarsest))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("device=cuda but CUDA is not available here; use device=cpu")
    return device


def _image_size(cfg: DictConfig, task_name: str) -> tuple[int, int]:
    size = cfg.image_size
    if size is None:
        size = [1024, 2048] if task_name == "segmentation" else cfg.model.image_size
    return _side_pair(size, "image_size")


def _side_pair(size, name: str) -> tuple[int, int]:
    """``size`` (a side or ``[H, W]``) as ``(H, W)``, each a multiple of the coarsest stride, 128."""
    h, w = (size, size) if isinstance(size, int) else (int(s) for s in size)
    if h % 128 or w % 128:
        raise BenchmarkError(f"{name} must be a multiple of 128 (the coarsest stride), got {h}x{w}")
    return h, w


def _train_image_size(cfg: DictConfig, task_name: str, size: tuple[int, int]) -> tuple[int, int]:
    """The input size of the training measures: ``train_image_size``; else ``image_size`` when given; else what
    training runs at: the model's resolution (detection, the same as predict) or the training crop
    (segmentation: ``data.crop_size``, 512x1024 for Cityscapes, where prediction runs at 1024x2048; padded up to
    a multiple of ``data.size_divisor``, as the training batches are)."""
    chosen = cfg.get("train_image_size")
    if chosen is None:
        crop = cfg.get("data", {}).get("crop_size")
        if cfg.image_size is not None or task_name != "segmentation" or crop is None:
            return size
        from datasets.segmentation import padded_size

        crop = (crop, crop) if isinstance(crop, int) else tuple(int(v) for v in crop)
        return padded_size(crop, int(cfg.data.get("size_divisor") or 128))
    return _side_pair(chosen, "train_image_size")


#: Batches used on a GPU when none is given: the sizes effdet's published measurements used.
GPU_PREDICT_BATCH = {"d0": 32, "d1": 32, "d2": 16, "d3": 16, "d4": 8, "d5": 4, "d6": 4, "d7": 2, "d7x": 2}
GPU_TRAIN_BATCH = {"d0": 32, "d1": 16, "d2": 16, "d3": 8, "d4": 4, "d5": 2, "d6": 2, "d7": 1, "d7x": 1}


def _batches(cfg: DictConfig, device: torch.device, task_name: str) -> tuple[int, int]:
    if device.type != "cuda":
        auto_predict = auto_train = 2
    elif task_name == "segmentation":
        auto_predict = auto_train = 4
    else:
        auto_predict, auto_train = GPU_PREDICT_BATCH.get(cfg.scale, 8), GPU_TRAIN_BATCH.get(cfg.scale, 4)
    return int(cfg.batch_size or auto_predict), int(cfg.train_batch_size or auto_train)


def _flops(model: torch.nn.Module, size: tuple[int, int]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).cpu().eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, *size))
    return int(counter.get_total_flops())


def _random_targets(b: int, size: tuple[int, int], num_classes: int, *, per_image: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    xy = torch.rand(b, per_image, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = (torch.rand(b, per_image, 2, generator=g) * 0.25 + 0.05) * torch.tensor([w, h])
    boxes = torch.cat([xy, xy + wh], -1)
    labels = torch.randint(0, num_classes, (b, per_image), generator=g)
    return boxes.to(device), labels.to(device)


def _agreement(ours: dict, theirs: torch.Tensor, cls_diff: float) -> dict[str, Any]:
    """Detections of the same weights: sorted scores compared position by position, and the share of this
    project's boxes that effdet also found (same class, IoU > 0.99)."""
    from torchvision.ops import box_iou

    matched = total = 0
    score_diff = 0.0
    for i in range(theirs.shape[0]):
        n = int(ours["num_detections"][i])
        ref = theirs[i][theirs[i, :, 4] > 0]
        m = min(n, ref.shape[0])
        a = ours["scores"][i, :m].float().sort(descending=True).values
        b = ref[:m, 4].float().sort(descending=True).values
        if m:
            score_diff = max(score_diff, float((a - b).abs().max()))
            iou = box_iou(ours["boxes"][i, :n].float(), ref[:, :4].float())
            same = ours["labels"][i, :n, None] + 1 == ref[None, :, 5].long()
            matched += int(((iou > 0.99) & same).any(1).sum())
        total += n
    return {"max_class_logit_diff": cls_diff, "max_sorted_score_diff": score_diff,
            "detections_matched": matched / max(total, 1), "detections": total}


# ----------------------------------------------------------------------------------------------- main
def _effdet_paths(cfg: DictConfig, paths: FastPaths) -> FastPaths:
    """effdet's fast paths in the timed measures: this project's, with ``effdet_compile`` (when set) in place of
    ``fast.compile`` (e.g. this project compiled against effdet eager, without minutes of compiling effdet)."""
    choice = cfg.get("effdet_compile")
    if choice is None:
        return paths
    if not isinstance(choice, bool):
        raise BenchmarkError(f"effdet_compile must be null, true or false, got {choice!r}")
    return replace(paths, compile=choice)


def run_benchmark(cfg: DictConfig, emit: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Run the measurements of ``cfg`` (configs/benchmark.yaml); ``emit`` sees each row as it is made."""
    from tasks.runner import build_model, build_task

    unknown = [m for m in cfg.measures if m not in MEASURES]
    if unknown:
        raise BenchmarkError(f"unknown measures {unknown}; choose from {list(MEASURES)}")
    compare = cfg.compare
    if compare not in (None, "effdet"):
        raise BenchmarkError(f"compare must be null or effdet, got {compare!r}")
    task_name = cfg.task.name
    if task_name == "detection":
        _train_boxes(cfg)  # a bad value is reported before anything is built
    if compare and task_name != "detection":
        raise BenchmarkError("compare=effdet is for task=detection (effdet has no segmentation model)")
    if cfg.effdet_checkpoint and not compare:
        raise BenchmarkError(f"effdet_checkpoint={cfg.effdet_checkpoint} is loaded through effdet's model: it needs "
                             "compare=effdet")
    for name, least in (("iters", 1), ("rounds", 1), ("warmup", 0)):
        _int_option(cfg, name, least)
    device = _device(cfg.device)
    # Measures that need CUDA fail here, before anything is measured, not after the others ran.
    if device.type != "cuda" and "fit" in cfg.measures and cfg.task.module.get("cuda_graph", False):
        raise BenchmarkError("task.module.cuda_graph=true (the captured training step) needs device=cuda")
    torch.set_flush_denormal(True)  # as training and evaluation run: denormals make CPU timings erratic
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = bool(cfg.get("cudnn_benchmark", True))
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    size = _image_size(cfg, task_name)
    train_size = _train_image_size(cfg, task_name, size)
    if list(cfg.measures) == ["data"]:
        return _data_rows(cfg, emit)
    if compare and train_size != size and {"ops", "train", "fit"} & set(cfg.measures):
        raise BenchmarkError(f"compare=effdet builds effdet's model for image_size {size[0]}x{size[1]}: its "
                             f"training measures run at that size too, so train_image_size "
                             f"{train_size[0]}x{train_size[1]} cannot be compared; leave it unset")
    task = build_task(cfg, build_model(cfg)).eval()
    calibrate = bool(cfg.calibrate_bn) and not (compare and cfg.effdet_checkpoint)  # a checkpoint's are kept

    def calibrated(model: torch.nn.Module) -> None:  # random weights: BatchNorm statistics of one training pass
        if calibrate:
            g = torch.Generator().manual_seed(cfg.seed)
            calibrate_bn(model, torch.randn(_calibration_images(size), 3, *size, generator=g), device)

    ref = _Effdet(cfg, task, size, calibrated) if compare else None
    if ref is None:
        calibrated(task.model)
    paths = FastPaths(**OmegaConf.to_container(cfg.fast)).resolve(device)
    theirs = _effdet_paths(cfg, paths)
    batch, train_batch = _batches(cfg, device, task_name)
    if train_batch == 1 and {"ops", "train", "fit"} & set(cfg.measures):
        stride = max(spec.stride for spec in task.model.out_specs.values())
        if all(-(-side // stride) == 1 for side in train_size):
            raise BenchmarkError(
                f"train_batch_size=1 at {_size_text(train_size)}: the coarsest feature map (stride {stride}) is 1x1, "
                "where BatchNorm cannot train on one value per channel; use train_batch_size >= 2 or a "
                f"train_image_size above {stride}")

    common = {
        "task": task_name, "backbone": cfg.backbone.name, "scale": cfg.scale, "device": _device_name(device),
        "image_size": list(size), "precision": paths.precision, "channels_last": paths.channels_last,
        "compile": paths.compile, "cudagraphs": paths.cudagraphs, "fold_bn": paths.fold_bn,
        "calibrated_bn": calibrate,
    }
    rows: list[dict] = []

    def add(measure: str, impl: str, **fields) -> None:
        row = {"measure": measure, "impl": impl, **common, **fields}
        rows.append(row)
        emit(row)

    def add_pair(measure: str, times: dict, per_call_images: int, *, unit: str, ours: dict | None = None,
                 **fields) -> None:
        ours = ours or {}
        both = "effdet" in times and "effdense" in times
        ratio = round(times["effdense"]["seconds"] / times["effdet"]["seconds"], 3) if both else None
        for impl, t in times.items():
            value = per_call_images / t["seconds"] if unit == "images/s" else t["seconds"] * 1000
            extra = {"ratio": ratio} if impl == "effdense" and ratio is not None else {}
            if impl == "effdense":
                extra.update(ours)
            else:  # effdet's model as it comes: compiled or not as effdet_compile says, BatchNorm never folded
                extra.update(compile=theirs.compile, fold_bn=False)
            add(measure, impl, value=round(value, 2), unit=unit, ms_per_call=round(t["seconds"] * 1000, 3),
                spread=round(t["spread"], 3), peak_memory_mb=t["peak_memory_mb"] or _rss_mb(device),
                **fields, **extra)

    measures = list(cfg.measures)
    if "params" in measures:
        add("params", "effdense", value=sum(p.numel() for p in task.model.parameters()), unit="parameters")
        if ref:
            add("params", "effdet", value=sum(p.numel() for p in ref.model.parameters()), unit="parameters",
                model=ref.name)
    if "flops" in measures:
        flops = _flops(task.model, size)
        add("flops", "effdense", value=round(flops / 1e9, 3), unit="GFLOPs (2 x multiply-adds)")
        if ref:
            add("flops", "effdet", value=round(_flops(ref.model, size) / 1e9, 3), unit="GFLOPs (2 x multiply-adds)",
                model=ref.name)

    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(batch, 3, *size, generator=g).to(device)
    train_fields = {"image_size": list(train_size)}  # the training measures' rows say their input's size
    # effdet's bare step, for the loop's ratio, unless 'train' times it
    effdet_step_for_fit = bool(ref) and "fit" in measures and "train" not in measures
    if {"ops", "train"} & set(measures) or effdet_step_for_fit:
        # (images, boxes, labels) for detection, (images, masks) for segmentation
        train_inputs = _train_inputs(task_name, images, train_batch, train_size, task.num_classes, cfg.seed,
                                     _train_boxes(cfg))

    if ref and "agreement" in measures:
        exact = FastPaths(channels_last=paths.channels_last, fold_bn=paths.fold_bn, precision="fp32", compile=False,
                          cudagraphs=False)
        ours_pred, _ = prepare_predictor(task, exact, device)
        theirs_pred = ref.predictor(exact.resolve(device), device, size)
        x = images[:2]
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true float32 here
        with torch.inference_mode():
            flat = FlatDetector(task.model.to(device).eval(), task.num_classes)(x)[0]
            cls_ref, _ = ref.model.to(device).eval()(x)
            cls_ref = flatten_levels(dict(enumerate(cls_ref)), task.num_classes)  # effdet's per-level list
            cls_diff = float((flat - cls_ref).abs().max())
            task.model.cpu(), ref.model.cpu()
            agree = _agreement(ours_pred(x), theirs_pred(x), cls_diff)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        add("agreement", "effdense", model=ref.name, **{k: round(v, 7) if isinstance(v, float) else v
                                                        for k, v in agree.items()})

    if "ops" in measures:
        eager = FastPaths(channels_last=paths.channels_last, fold_bn=paths.fold_bn, precision=paths.precision,
                          compile=False, cudagraphs=False)
        ours_pred, _ = prepare_predictor(task, eager, device)
        x = images[:batch]
        counts = {"effdense": (partial(ours_pred, x), _our_train_step(task, eager, device, *train_inputs))}
        if ref:
            counts["effdet"] = (partial(ref.predictor(eager.resolve(device), device, size), x),
                                _effdet_train_step(ref, eager, device, *train_inputs))
        found = {impl: [count_ops(fn) for fn in fns] for impl, fns in counts.items()}
        for impl, (pred, step) in found.items():
            extra = {}
            if impl == "effdense" and "effdet" in found:
                extra["ratio"] = round(step.operations / found["effdet"][1].operations, 3)
            add("ops", impl, value=step.operations, unit="operations per training step", batch=train_batch,
                train_host_syncs=step.host_syncs, train_views=step.views, predict_operations=pred.operations,
                predict_batch=batch, predict_host_syncs=pred.host_syncs, predict_image_size=list(size),
                **train_fields, **extra)

    timing = {"device": device, "warmup": int(cfg.warmup), "iters": int(cfg.iters), "rounds": int(cfg.rounds)}
    for measure, n in (("predict", batch), ("latency", 1)):
        if measure not in measures:
            continue
        ours_pred, _ = prepare_predictor(task, paths, device)
        x = images[:n]
        fns = {"effdense": partial(ours_pred, x)}
        if ref:
            fns["effdet"] = partial(ref.predictor(theirs, device, size), x)
        times = _time_rounds(fns, **timing)
        if cfg.profile:
            _profile(f"{measure} batch {n}", fns, device)
        unit = "images/s" if measure == "predict" else "ms"
        add_pair(measure, times, n, unit=unit, batch=n, **({"model": ref.name} if ref else {}))
    if "train" in measures:
        fns = {"effdense": _our_train_step(task, paths, device, *train_inputs)}
        if ref:
            fns["effdet"] = _effdet_train_step(ref, theirs, device, *train_inputs)
        times = _time_rounds(fns, **timing)
        if cfg.profile:
            _profile(f"train batch {train_batch}", fns, device)
        add_pair("train", times, train_batch, unit="images/s", batch=train_batch, ours=_loss_fields(task, device),
                 **train_fields)
    if effdet_step_for_fit:  # the loop's ratio is to effdet's bare step: that alone, not this project's too
        fns = {"effdet": _effdet_train_step(ref, theirs, device, *train_inputs)}
        times = _time_rounds(fns, **timing)
        if cfg.profile:
            _profile(f"train batch {train_batch}", fns, device)
        add_pair("train", times, train_batch, unit="images/s", batch=train_batch, **train_fields)
    fns = None  # the timed closures hold model copies and optimizer state: not through the loop's peak memory
    if "fit" in measures:
        fit = _fit(cfg, task, paths, device, train_batch, train_size)
        train_row = next((r for r in rows if r["measure"] == "train" and r["impl"] == "effdense"), None)
        if train_row is not None:
            fit["vs_train"] = round(fit["ms_per_call"] / train_row["ms_per_call"], 3)
        effdet_row = next((r for r in rows if r["measure"] == "train" and r["impl"] == "effdet"), None)
        if effdet_row is not None:  # effdet has no training loop: its bare step is what the loop is held to
            fit["ratio"] = round(fit["ms_per_call"] / effdet_row["ms_per_call"], 3)
            fit["ratio_to"] = "effdet train step"
        add("fit", "effdense", batch=train_batch, **fit, **_loss_fields(task, device), **train_fields)
    if "data" in measures:
        rows += _data_rows(cfg, emit)
    return rows


def _fit(cfg: DictConfig, task, paths: FastPaths, device: torch.device, batch: int, size: tuple[int, int]) -> dict:
    """Run ``warmup + iters * rounds + 1`` steps of a Lightning fit, time ``rounds`` blocks of ``iters`` steps
    after the warm-up and count the operations of one step; see the module docstring."""
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
        data["boxes"], data["labels"] = _random_targets(batch, size, fit_task.num_classes, per_image=_train_boxes(cfg),
                                                        device="cpu", seed=int(cfg.seed))
    else:
        data["masks"] = _random_masks(batch, size, int(cfg.data.num_classes), int(cfg.seed))
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
            "lightning_precision": precision, "peak_memory_mb": _peak_mb(device)}


def _loss_fields(task, device: torch.device) -> dict[str, str]:
    """Which focal-loss and matching implementations this project's training step uses on ``device`` (detection
    only)."""
    fields = {}
    backend = getattr(getattr(task, "loss", None), "focal_backend", None)
    if backend is not None:
        fields["focal_loss"] = backend(device)
    backend = getattr(getattr(getattr(task, "assigner", None), "matcher", None), "backend", None)
    if backend is not None:
        fields["matching"] = backend(device)
    return fields


def _int_option(cfg: DictConfig, name: str, least: int, default: int | None = None) -> int:
    """``cfg[name]`` (``default`` when absent); :class:`BenchmarkError` unless it is an integer >= ``least``."""
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise BenchmarkError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


def _train_boxes(cfg: DictConfig) -> int:
    return _int_option(cfg, "train_boxes", 1, default=8)


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return _rss_mb(device)


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
        _sync(self.device)
        self.marks.append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.count_at + 1 and self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.count = OpCount(self.counter.operations, self.counter.syncs, self.counter.views)
            self.counter = None
        if batch_idx == self.count_at:
            self.counter = _OpCounter()
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
            self.profiler = _start_profiler(self.device)
        if self.profile_at is not None and batch_idx == self.profile_at + self.profile_steps:
            _print_profile(self.profiler, self.device, f"fit, {self.profile_steps} Lightning steps")
            self.profiler = None

    def seconds(self) -> tuple[float, float]:
        """The median block's seconds per step, and the blocks' spread."""
        blocks = [(b - a) / self.iters for a, b in zip(self.marks, self.marks[1:])]
        if len(blocks) != self.rounds:
            raise BenchmarkError(f"measure 'fit' timed {len(blocks)} blocks of steps, expected {self.rounds}")
        return statistics.median(blocks), (max(blocks) - min(blocks)) / min(blocks)


def _train_inputs(task_name: str, images: torch.Tensor, train_batch: int, size: tuple[int, int], num_classes: int,
                  seed: int, boxes: int = 8) -> tuple[torch.Tensor, ...]:
    """One training batch of ``train_batch`` at ``size`` on the images' device: ``(images, boxes, labels)`` for
    detection (``boxes`` per image), ``(images, masks)`` for segmentation (random classes, 5 % of the pixels
    ignored, as a Cityscapes mask has unlabelled pixels)."""
    device = images.device
    if train_batch <= images.shape[0] and tuple(images.shape[-2:]) == tuple(size):
        x = images[:train_batch]
    else:
        x = torch.randn(train_batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(device)
    if task_name == "detection":
        return (x, *_random_targets(train_batch, size, num_classes, per_image=boxes, device=device, seed=seed))
    return x, _random_masks(train_batch, size, num_classes, seed).to(device)


def _random_masks(batch: int, size: tuple[int, int], num_classes: int, seed: int) -> torch.Tensor:
    """uint8 ``[batch, H, W]`` class maps: random classes, 5 % of the pixels 255 (ignored)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, num_classes, (batch, *size), dtype=torch.uint8, generator=g)
    return masks.masked_fill(torch.rand(batch, *size, generator=g) < 0.05, 255)


@dataclass(frozen=True)
class OpCount:
    operations: int  #: tensor operations dispatched (views and allocations not counted)
    host_syncs: int  #: of which wait for the device (``.item()``, ``nonzero``, boolean indexing, ``equal``)
    #: view operations dispatched: they launch nothing on the device, but each costs host time (dispatch, and in
    #: training an autograd node), so a change that trades kernels for views can make a host-bound step slower
    views: int = 0


#: Operations that only allocate or describe memory (no kernel runs).
_NOT_KERNELS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
                "is_same_size", "set_", "resize_", "_unsafe_view"}
#: Operations whose result the host must wait for.
_HOST_SYNCS = {"_local_scalar_dense", "nonzero", "nonzero_numpy", "equal", "masked_select", "_unique", "_unique2",
               "unique_dim", "unique_consecutive", "is_nonzero", "bincount"}
#: Indexing operations that synchronise when an index is a boolean mask (it is turned into positions first).
_MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
    if (first is not None and first.device.type == "cpu" and not on_device and torch.cuda.is_initialized()
            and not first.is_pinned()):
        # A process that uses CUDA keeps this value on the host: reading it waits for nothing. (Without CUDA every
        # tensor is on the host, and the count says what would wait on a GPU. Pinned memory is where a non-blocking
        # copy from the device lands: reading it waits for that copy.)
        return False
    if name in _HOST_SYNCS:
        return True
    if name in _MASK_INDEXING and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if name == "repeat_interleave":  # the output size is read from the device unless given
        return kwargs.get("output_size") is None
    if first is None:
        return False
    if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):  # device -> host memory
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        pinned = non_blocking and first.device.type == "cpu" and first.is_pinned()  # lands later; nothing waits
        return first.device.type == "cpu" and args[1].device.type != "cpu" and not pinned
    if first.device.type == "cpu":
        return False
    if name == "nms":  # torchvision's GPU NMS finishes its greedy pass on the host
        return True
    if name == "_to_copy":  # device -> host copy
        return torch.device(kwargs.get("device") or first.device).type == "cpu"
    return False


class _OpCounter(TorchDispatchMode):
    """A dispatch mode that counts tensor operations (``.operations``), host synchronisations (``.syncs``) and view
    operations (``.views``)."""

    def __init__(self) -> None:
        super().__init__()
        self.operations = self.syncs = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.is_view:
            self.views += 1
        elif name not in _NOT_KERNELS:
            self.operations += 1
            self.syncs += _is_sync(name, args, kwargs or {})
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> OpCount:
    """Runs ``fn`` once (after one uncounted call) and counts the tensor operations it dispatches."""
    fn()
    with _OpCounter() as counter:
        fn()
    return OpCount(counter.operations, counter.syncs, counter.views)


def _data_rows(cfg: DictConfig, emit: Callable[[dict], None]) -> list[dict]:
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


def _profile(title: str, fns: dict[str, Callable[[], Any]], device: torch.device, calls: int = 3) -> None:
    """Print where the time of ``calls`` calls of each function goes (torch.profiler, top operators) to stderr."""
    for name, fn in fns.items():
        prof = _start_profiler(device)
        for _ in range(calls):
            fn()
        _print_profile(prof, device, f"{name} {title}, {calls} calls")


def _start_profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
    prof.__enter__()
    prof.started_at = time.perf_counter()
    return prof


def _print_profile(prof, device: torch.device, title: str) -> None:
    """Stop ``prof`` and print its top operators, by device time on a GPU (by CPU time on the CPU), and the wall
    time it covered, to stderr."""
    _sync(device)
    wall_ms = (time.perf_counter() - prof.started_at) * 1000
    prof.__exit__(None, None, None)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    print(f"\n### profile: {title} (wall {wall_ms:.1f} ms, profiler included)\n{table}", file=sys.stderr, flush=True)


def _our_train_step(task, paths: FastPaths, device, x, *targets) -> Callable[[], None]:
    """This project's training step on ``x`` and its ``targets`` (detection: boxes, labels; segmentation: masks):
    forward, loss, backward, SGD step."""
    from inference.fast_paths import _anchors_for
    from tasks.detection import DetectionTask

    model = _working_copy(task.model, paths, device, train=True)
    if paths.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    detection = isinstance(task, DetectionTask)
    net = FlatDetector(model, task.num_classes) if detection else model
    net = compile_module(net, paths, training=True)
    opt = _sgd(model)
    if detection:
        anchors = _anchors_for(task, model, tuple(x.shape[-2:]), device)
        assigner, focal = task.assigner, task.loss

        def criterion(out, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
            cls_t, box_t, num_pos = assigner(anchors, gt_boxes, gt_labels)
            return focal(*out, cls_t, box_t, num_pos)["loss"]
    else:  # the task's loss (cross-entropy or OHEM, the auxiliary term) on the label-sized logits, as in training

        def criterion(out, masks: torch.Tensor) -> torch.Tensor:
            return task.loss(out, masks.long())["loss"]

    def loss(images: torch.Tensor, *gt: torch.Tensor) -> torch.Tensor:
        with paths.autocast(device):
            out = net(images)
        return criterion(out, *gt)

    def step() -> None:
        loss(x, *targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _effdet_train_step(ref: _Effdet, paths: FastPaths, device, x, boxes, labels) -> Callable[[], None]:
    bench, model = ref.trainer(paths, device)
    if paths.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = _sgd(model)
    # effdet's targets: yxyx boxes, classes counted from 1.
    target = {"bbox": boxes[..., [1, 0, 3, 2]].float(), "cls": (labels + 1).float()}

    def step() -> None:
        with paths.autocast(device):
            loss = bench(x, target)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    # The multi-tensor (foreach) implementation on every device, as on CUDA: a few operations per step, not a few
    # per parameter.
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=4e-5, foreach=True)


def _rss_mb(device: torch.device) -> float | None:
    """On the CPU: the process's peak resident memory so far (Linux reports KiB)."""
    if device.type == "cuda":
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment() -> dict[str, Any]:
    import timm
    import torchvision

    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
           "python": platform.python_version()}
    try:
        env["effdet"] = importlib.metadata.version("effdet")
    except importlib.metadata.PackageNotFoundError:
        pass
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
    return env


def format_table(rows: list[dict]) -> str:
    """A readable table of the rows (one line per measurement and implementation)."""
    header = ["measure", "impl", "batch", "value", "unit", "ratio", "peak MB", "input"]
    lines = [header]
    for r in rows:
        if r["measure"] == "data":
            lines.append(["data", f"{r['workers']} workers", str(r["batch"]), f"{r['value']:,.1f}",
                          f"images/s ({r['per_worker']:,.1f} per worker)", "", "", _size_text(r.get("image_size"))])
            continue
        if r["measure"] == "agreement":
            value = (f"logits {r['max_class_logit_diff']:.1e}, scores {r['max_sorted_score_diff']:.1e}, "
                     f"matched {r['detections_matched']:.3f}")
            lines.append([r["measure"], f"{r['impl']} vs {r['model']}", "", value, "", "", "", ""])
            continue
        if r["measure"] == "ops":
            value = (f"train {r['value']:,} ({r['train_host_syncs']} syncs, {r.get('train_views', 0):,} views), "
                     f"predict {r['predict_operations']:,} "
                     f"({r['predict_host_syncs']} syncs, batch {r['predict_batch']})")
            sizes = f"train {_size_text(r['image_size'])}, predict {_size_text(r['predict_image_size'])}"
            lines.append(["ops", r["impl"], str(r["batch"]), value, "operations", "" if r.get("ratio") is None
                          else f"{r['ratio']:.3f}", "", sizes])
            continue
        value = r["value"]
        value = f"{value:,}" if isinstance(value, int) else f"{value:,.2f}" if value >= 10 else f"{value:.3f}"
        ratio = r.get("ratio")
        lines.append([r["measure"], r["impl"], str(r.get("batch", "")), value, r["unit"],
                      "" if ratio is None else f"{ratio:.3f}",
                      "" if r.get("peak_memory_mb") is None else f"{r['peak_memory_mb']:,.0f}",
                      "" if r["measure"] == "params" else _size_text(r.get("image_size"))])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _size_text(size) -> str:
    """``[H, W]`` (or a side) as ``HxW``; empty when unknown."""
    if size is None:
        return ""
    h, w = (size, size) if isinstance(size, int) else size
    return f"{h}x{w}"


def write_rows(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)

