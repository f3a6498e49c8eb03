"""One function per measure (see :mod:`benchmarks` for what each reports), and :data:`MEASURES`, the table that
:func:`benchmarks.harness.run_benchmark` walks in order."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch

from benchmarks.context import RunContext
from benchmarks.data_measure import data_rows
from benchmarks.effdet_ref import detection_agreement, effdet_train_step
from benchmarks.fit import time_fit
from benchmarks.onnx_measure import measure_latency_ort, measure_latency_ort_int8
from benchmarks.ops import count_ops
from benchmarks.timing import profile_calls, time_rounds
from benchmarks.train_step import loss_fields, our_train_step
from heads import flatten_levels
from inference.fast_paths import FastPaths, FlatDetector, prepare_predictor

__all__ = ["MEASURES"]


def measure_params(run: RunContext) -> None:
    run.add("params", "effdense", value=sum(p.numel() for p in run.task.model.parameters()), unit="parameters")
    if run.ref:
        run.add("params", "effdet", value=sum(p.numel() for p in run.ref.model.parameters()), unit="parameters",
                model=run.ref.name)


def _flops(model: torch.nn.Module, size: tuple[int, int]) -> int:
    """FLOPs (2 x multiply-adds) of one float32 forward pass of one image of ``size`` on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).cpu().eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, *size))
    return int(counter.get_total_flops())


def measure_flops(run: RunContext) -> None:
    unit = "GFLOPs (2 x multiply-adds)"
    run.add("flops", "effdense", value=round(_flops(run.task.model, run.size) / 1e9, 3), unit=unit)
    if run.ref:
        run.add("flops", "effdet", value=round(_flops(run.ref.model, run.size) / 1e9, 3), unit=unit,
                model=run.ref.name)


def measure_agreement(run: RunContext) -> None:
    """Both models predict the same images in true float32 (TF32 off): class logits and detections compared."""
    task, ref, device, paths = run.task, run.ref, run.device, run.paths
    if ref is None:
        return
    exact = FastPaths(channels_last=paths.channels_last, fold_bn=paths.fold_bn, precision="fp32", compile=False,
                      cudagraphs=False)
    ours_pred, _ = prepare_predictor(task, exact, device)
    theirs_pred = ref.predictor(exact.resolve(device), device, run.size)
    x = run.images[:2]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true float32 here
    with torch.inference_mode():
        flat = FlatDetector(task.model.to(device).eval(), task.num_classes)(x)[0]
        cls_ref, _ = ref.model.to(device).eval()(x)
        cls_ref = flatten_levels(dict(enumerate(cls_ref)), task.num_classes)  # effdet's per-level list
        cls_diff = float((flat - cls_ref).abs().max())
        task.model.cpu(), ref.model.cpu()
        agree = detection_agreement(ours_pred(x), theirs_pred(x), cls_diff)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    run.add("agreement", "effdense", model=ref.name, **{k: round(v, 7) if isinstance(v, float) else v
                                                        for k, v in agree.items()})


def measure_ops(run: RunContext) -> None:
    """Operations (and host synchronisations) of one eager predict call and one eager training step."""
    task, ref, device, paths, batch = run.task, run.ref, run.device, run.paths, run.batch
    eager = FastPaths(channels_last=paths.channels_last, fold_bn=paths.fold_bn, precision=paths.precision,
                      compile=False, cudagraphs=False)
    ours_pred, _ = prepare_predictor(task, eager, device)
    x = run.images[:batch]
    counts = {"effdense": (partial(ours_pred, x), our_train_step(task, eager, device, *run.train_inputs))}
    if ref:
        counts["effdet"] = (partial(ref.predictor(eager.resolve(device), device, run.size), x),
                            effdet_train_step(ref, eager, device, *run.train_inputs))
    found = {impl: [count_ops(fn) for fn in fns] for impl, fns in counts.items()}
    for impl, (pred, step) in found.items():
        extra = {}
        if impl == "effdense" and "effdet" in found:
            extra["ratio"] = round(step.operations / found["effdet"][1].operations, 3)
        run.add("ops", impl, value=step.operations, unit="operations per training step", batch=run.train_batch,
                train_host_syncs=step.host_syncs, train_views=step.views, predict_operations=pred.operations,
                predict_batch=batch, predict_host_syncs=pred.host_syncs, predict_image_size=list(run.size),
                **run.train_fields, **extra)


def _measure_prediction(run: RunContext, measure: str, n: int) -> None:
    """The predict pipeline timed on ``n`` images: images/s (``predict``) or milliseconds (``latency``)."""
    ours_pred, _ = prepare_predictor(run.task, run.paths, run.device)
    x = run.images[:n]
    fns = {"effdense": partial(ours_pred, x)}
    if run.ref:
        fns["effdet"] = partial(run.ref.predictor(run.theirs, run.device, run.size), x)
    times = time_rounds(fns, **run.timing)
    if run.cfg.profile:
        profile_calls(f"{measure} batch {n}", fns, run.device)
    unit = "images/s" if measure == "predict" else "ms"
    run.add_pair(measure, times, n, unit=unit, batch=n, **({"model": run.ref.name} if run.ref else {}))


def measure_predict(run: RunContext) -> None:
    _measure_prediction(run, "predict", run.batch)


def measure_latency(run: RunContext) -> None:
    _measure_prediction(run, "latency", 1)


def _time_train_steps(run: RunContext, fns: dict[str, Callable[[], None]], **fields) -> None:
    """Time training steps (``train`` rows), with a profile when asked."""
    times = time_rounds(fns, **run.timing)
    if run.cfg.profile:
        profile_calls(f"train batch {run.train_batch}", fns, run.device)
    run.add_pair("train", times, run.train_batch, unit="images/s", batch=run.train_batch, **fields,
                 **run.train_fields)


def measure_train(run: RunContext) -> None:
    fns = {"effdense": our_train_step(run.task, run.paths, run.device, *run.train_inputs)}
    if run.ref:
        fns["effdet"] = effdet_train_step(run.ref, run.theirs, run.device, *run.train_inputs)
    _time_train_steps(run, fns, ours=loss_fields(run.task, run.device))


def measure_fit(run: RunContext) -> None:
    """The Lightning loop, held to the bare ``train`` step's time (``vs_train``) and effdet's (``ratio``)."""
    if run.effdet_step_for_fit:  # the loop's ratio is to effdet's bare step: that alone, not this project's too
        _time_train_steps(run, {"effdet": effdet_train_step(run.ref, run.theirs, run.device, *run.train_inputs)})
    fit = time_fit(run.cfg, run.task, run.paths, run.device, run.train_batch, run.train_size)
    train_row = next((r for r in run.rows if r["measure"] == "train" and r["impl"] == "effdense"), None)
    if train_row is not None:
        fit["vs_train"] = round(fit["ms_per_call"] / train_row["ms_per_call"], 3)
    effdet_row = next((r for r in run.rows if r["measure"] == "train" and r["impl"] == "effdet"), None)
    if effdet_row is not None:  # effdet has no training loop: its bare step is what the loop is held to
        fit["ratio"] = round(fit["ms_per_call"] / effdet_row["ms_per_call"], 3)
        fit["ratio_to"] = "effdet train step"
    run.add("fit", "effdense", batch=run.train_batch, **fit, **loss_fields(run.task, run.device), **run.train_fields)


def measure_data(run: RunContext) -> None:
    run.rows.extend(data_rows(run.cfg, run.emit))


#: Every measure by its name in ``measures``, in the order a run takes them.
MEASURES: dict[str, Callable[[RunContext], None]] = {
    "params": measure_params,
    "flops": measure_flops,
    "agreement": measure_agreement,
    "ops": measure_ops,
    "predict": measure_predict,
    "latency": measure_latency,
    "latency_ort": measure_latency_ort,
    "latency_ort_int8": measure_latency_ort_int8,
    "train": measure_train,
    "fit": measure_fit,
    "data": measure_data,
}
