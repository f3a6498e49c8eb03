"""Fast inference paths: BatchNorm folding, channels-last, bf16 autocast, torch.compile with CUDA graphs.

:class:`FastPaths` says which are on; ``"auto"`` picks what is safe and fast on the device (bf16 and
compilation on CUDA, float32 eager on the CPU). :func:`prepare_predictor` turns a trained
:class:`tasks.DetectionTask` or :class:`tasks.SegmentationTask` into a callable
``normalised images -> detections | class maps`` with those paths applied; the task itself is not changed.

What each path changes in the results:

- ``fold_bn``, ``channels_last``, ``compile``: float32 rounding only (about 1e-6 relative);
- ``precision="bf16"``: scores move by about 1e-2 and near-tied detections can swap ranks
  (``tests/test_fast_paths.py`` states the tolerance it checks).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbones.timm_backbone import inplace_activations_for_inference
from heads import flatten_levels
from models.fusion import fold_batchnorm

__all__ = [
    "FastPaths",
    "FlatDetector",
    "SegmentationPredictor",
    "compile_module",
    "native_bf16_cuda",
    "prepare_predictor",
]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16_cuda(device: torch.device | str | None = None) -> bool:
    """Whether the CUDA GPU ``device`` (default: the current one) computes in bfloat16 natively (compute capability
    8.0+). Older GPUs emulate it, slower than float32, so ``"auto"`` precisions (inference and training) only pick
    bf16 where it is native."""
    if not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else None
    with torch.cuda.device(device) if device is not None and device.index is not None else contextlib.nullcontext():
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before the argument existed: emulation was not counted
            return torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class FastPaths:
    """Inference speed-ups; each can be switched off. ``"auto"`` values are settled by :meth:`resolve`."""

    channels_last: bool = True
    fold_bn: bool = True
    precision: str = "auto"  #: "auto" (bf16 on a native-bf16 GPU, fp32 elsewhere) | "fp32" | "bf16" | "fp16"
    compile: bool | str = "auto"  #: "auto": on CUDA only (CPU compilation needs a C++ toolchain and minutes)
    cudagraphs: bool = True  #: with compile on CUDA, replay the compiled graph as a CUDA graph (static shapes)

    def resolve(self, device: torch.device | str) -> FastPaths:
        device = torch.device(device)
        cuda = device.type == "cuda"
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if cuda and native_bf16_cuda(device) else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        compile_ = self.compile
        if compile_ == "auto":
            compile_ = cuda
        if not isinstance(compile_, bool):
            raise TypeError(f"compile must be true, false or auto, got {compile_!r}")
        return replace(self, precision=precision, compile=compile_, cudagraphs=bool(self.cudagraphs and cuda))

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @contextlib.contextmanager
    def autocast(self, device: torch.device | str, *, cache_enabled: bool = True) -> Iterator[None]:
        """Autocast to :attr:`dtype` (nothing for fp32); ``cache_enabled=False`` inside CUDA graph capture."""
        device = torch.device(device)
        if self.precision == "fp32":
            yield
        else:
            with torch.autocast(device.type, dtype=self.dtype, cache_enabled=cache_enabled):
                yield

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FlatDetector(nn.Module):
    """``images -> (class logits [B, A, C], box deltas [B, A, 4])``: the detector and the flattening that
    post-processing needs, as one module (one compiled graph)."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return flatten_levels(out.cls_logits, self.num_classes), flatten_levels(out.box_deltas, 4)


class SegmentationPredictor(nn.Module):
    """``images -> class map [B, H, W]`` (int64): logits upsampled to the input size, then argmax."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images).logits
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(1)


def compile_module(module: nn.Module, paths: FastPaths, *, training: bool = False) -> Callable:
    """``torch.compile`` with static shapes; CUDA graphs ("reduce-overhead") for inference when asked."""
    if not paths.compile:
        return module
    mode = "reduce-overhead" if paths.cudagraphs and not training else None
    return torch.compile(module, mode=mode, dynamic=False)


def optimize_model(model: nn.Module, paths: FastPaths, device: torch.device | str) -> tuple[nn.Module, dict]:
    """An inference copy of ``model`` on ``device``: norms folded, channels-last, the backbone's activations in
    place again (out of place only for autograd's sake). Returns it and what was done."""
    info: dict[str, Any] = {}
    if paths.fold_bn:
        model, report = fold_batchnorm(model)
        info["folded_norms"], info["unfolded_norms"] = report.folded, report.remaining
    else:
        model = copy.deepcopy(model).eval()
    info["inplace_activations"] = inplace_activations_for_inference(model)
    model = model.to(device)
    if paths.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, info


def prepare_predictor(
    task: nn.Module, paths: FastPaths, device: torch.device | str
) -> tuple[Callable[[torch.Tensor], Any], dict]:
    """``normalised images [B, 3, H, W] -> output``: detections (``DetectionPostProcess`` dict, boxes in input
    pixels) for a detection task, class maps ``[B, H, W]`` for a segmentation task."""
    device = torch.device(device)
    paths = paths.resolve(device)
    model, info = optimize_model(task.model, paths, device)
    detection = hasattr(task, "postprocess")
    net = FlatDetector(model, task.num_classes) if detection else SegmentationPredictor(model)
    net = compile_module(net.eval(), paths)
    anchors_cache: dict[tuple, torch.Tensor] = {}

    @torch.inference_mode()
    def predict(images: torch.Tensor):
        if paths.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if paths.compile and paths.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with paths.autocast(device), torch.profiler.record_function("effdense.network"):
            out = net(images)
        if not detection:
            return out.clone() if paths.cudagraphs and paths.compile else out
        cls, box = out
        hw = tuple(images.shape[-2:])
        if hw not in anchors_cache:
            anchors_cache[hw] = _anchors_for(task, model, hw, device)
            if anchors_cache[hw].shape[0] != cls.shape[1]:
                raise RuntimeError(f"{anchors_cache[hw].shape[0]} anchors for {cls.shape[1]} predictions at {hw}")
        with torch.profiler.record_function("effdense.postprocess"):
            return task.postprocess(cls, box, anchors_cache[hw], hw)

    info["paths"] = paths.as_dict()
    return predict, info


def _anchors_for(task, model, hw: tuple[int, int], device) -> torch.Tensor:
    """Anchors for an input of size ``hw``: the head's map sizes come from the neck's strides."""
    shapes = {}
    for name, spec in model.out_specs.items():
        h, w = hw
        for _ in range(spec.stride.bit_length() - 1):  # each halving rounds up, as the network's does
            h, w = -(-h // 2), -(-w // 2)
        shapes[name] = (h, w)
    return task.anchors(shapes, device=device)
