"""Single-image latency of the exported model in ONNX Runtime, float32 (``latency_ort``) and int8
(``latency_ort_int8``), timed alternately with effdet's PyTorch float32 predict call of the same model.

The model is exported in-process as ``tools/export.py`` exports it (:class:`inference.export.ExportModule` with its
post-processing, batch 1, the run's ``image_size``) to a temporary folder; the int8 file is quantized from it by
:func:`inference.quantize.quantize_int8`, calibrated on random images like the timed one (a latency needs no
accuracy: the calibration's ranges change no kernel). The timed input is the ``latency`` measure's normalised image
mapped back to 0..255 pixels, so the graph normalises it into the same tensor. ONNX Runtime uses as many intra-op
threads as torch does in the run, and one inter-op thread.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.context import RunContext
from benchmarks.timing import time_rounds
from inference.export import ExportModule, export_onnx
from inference.quantize import quantize_int8

__all__ = ["CALIBRATION_IMAGES", "measure_latency_ort", "measure_latency_ort_int8"]

#: Random images the int8 file is calibrated on.
CALIBRATION_IMAGES = 4


def _pixels(run: RunContext, images: torch.Tensor) -> np.ndarray:
    """Normalised images as the exported graph's input (float RGB 0..255 scale, normalised inside the graph)."""
    return (images.cpu().float() * run.task.std.cpu() + run.task.mean.cpu()).numpy()


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _measure(run: RunContext, measure: str, int8: bool) -> None:
    model = run.task.model
    device = next(model.parameters()).device
    module = ExportModule(run.task, postprocess=True).cpu().eval()
    threads = torch.get_num_threads()
    feed = {"images": np.ascontiguousarray(_pixels(run, run.images[:1]))}
    fields: dict = {"runtime": "onnxruntime", "intra_op_threads": threads, "inter_op_threads": 1,
                    "precision": "int8" if int8 else "fp32", "compile": False, "cudagraphs": False,
                    "fold_bn": "onnxruntime's graph optimisation"}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(module, Path(tmp) / "model.onnx", image_size=run.size, batch_size=1)
        model.to(device)
        fields["float32_bytes"] = path.stat().st_size
        if int8:
            g = torch.Generator().manual_seed(run.cfg.seed + 1)
            calib = [_pixels(run, torch.randn(1, 3, *run.size, generator=g)) for _ in range(CALIBRATION_IMAGES)]
            quantize_int8(path, Path(tmp) / "model_int8.onnx", calib)
            path = Path(tmp) / "model_int8.onnx"
            fields["calibration"] = f"{CALIBRATION_IMAGES} random images (synthetic)"
        fields["model_bytes"] = path.stat().st_size
        session = _session(path, threads)
    fns = {"effdense": lambda: session.run(None, feed)}
    if run.ref:  # effdet's PyTorch float32 predict call, timed in the same alternating blocks
        theirs = replace(run.theirs, precision="fp32")
        predict = run.ref.predictor(theirs, run.device, run.size)
        x = run.images[:1]
        fns["effdet"] = lambda: predict(x)
        fields["ratio_to"] = "effdet's PyTorch float32 latency"
    times = time_rounds(fns, **run.timing)
    run.add_pair(measure, times, 1, unit="ms", batch=1, ours=fields, **({"model": run.ref.name} if run.ref else {}))


def measure_latency_ort(run: RunContext) -> None:
    _measure(run, "latency_ort", int8=False)


def measure_latency_ort_int8(run: RunContext) -> None:
    _measure(run, "latency_ort_int8", int8=True)
