"""Fast inference paths: BatchNorm folding, channels-last, bf16 autocast, torch.compile, CUDA graphs.

:class:`FastPaths` says which are on; ``"auto"`` picks what is safe and fast on the device (bf16 and
compilation on CUDA, float32 eager on the CPU). :func:`prepare_predictor` turns a trained
:class:`tasks.DetectionTask` or :class:`tasks.SegmentationTask` into a callable
``normalised images -> detections | class maps`` with those paths applied; the task itself is not changed.

What each path changes in the results:

- ``fold_bn``, ``channels_last``, ``compile``: float32 rounding only (about 1e-6 relative);
- ``cudagraphs``: none (the same kernels, replayed);
- ``precision="bf16"``: scores move by about 1e-2 and near-tied detections can swap ranks
  (``tests/test_fast_paths.py`` states the tolerance it checks).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from backbones.timm_backbone import inplace_activations_for_inference
from heads import flatten_levels
from layers.norm_folding import fold_batchnorm
from tasks.captured_step import warm_up
from utils.devices import native_bf16_cuda

log = logging.getLogger(__name__)

__all__ = [
    "CapturedCall",
    "FastPaths",
    "FlatDetector",
    "SegmentationPredictor",
    "compile_module",
    "prepare_predictor",
]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FastPaths:
    """Inference speed-ups; each can be switched off. ``"auto"`` values are settled by :meth:`resolve`."""

    channels_last: bool = True
    fold_bn: bool = True
    precision: str = "auto"  #: "auto" (bf16 on a native-bf16 GPU, fp32 elsewhere) | "fp32" | "bf16" | "fp16"
    compile: bool | str = "auto"  #: "auto": on CUDA only (CPU compilation needs a C++ toolchain and minutes)
    #: on CUDA, replay each input shape's predict call as a CUDA graph (:class:`CapturedCall`): network and, where
    #: it never waits for the host (the Triton NMS), post-processing, compiled or not
    cudagraphs: bool = True

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


def compile_module(module: nn.Module, paths: FastPaths, *, training: bool = False, graphs: bool | None = None
                   ) -> Callable:
    """``torch.compile`` with static shapes; for inference, torch's own CUDA graphs ("reduce-overhead") when
    ``graphs`` (default: ``paths.cudagraphs``). :func:`prepare_predictor` passes ``graphs=False`` and captures
    the whole predict call itself (:class:`CapturedCall`)."""
    if not paths.compile:
        return module
    graphs = paths.cudagraphs if graphs is None else graphs
    mode = "reduce-overhead" if graphs and not training else None
    return torch.compile(module, mode=mode, dynamic=False)


class CapturedCall:
    """``fn(inputs)`` replayed as a CUDA graph: one graph per input shape, dtype and layout, captured at its first
    call after ``warmup`` eager calls on a side stream (cuDNN autotuning, compilation, caches). Each call copies
    the input into the graph's static input, replays, and returns clones of the static outputs (tensors, or
    dicts, lists and tuples of them), so results stay valid after the next call.

    ``fn`` must not synchronise with the host or create CPU tensors on the device while it runs (for detection:
    post-processing with the Triton NMS, :meth:`heads.DetectionPostProcess.capturable`). Where capturing fails
    anyway, a warning says why and ``fn`` runs eagerly from then on (:attr:`failure` holds the reason; errors of
    the warm-up calls are raised as they are). Autocast's weight-cast cache is off while capturing. At most
    ``max_graphs`` graphs are kept (each holds its own memory pool); the least recently used is dropped.
    """

    def __init__(self, fn: Callable[[torch.Tensor], Any], *, warmup: int = 2, max_graphs: int = 4) -> None:
        if warmup < 1 or max_graphs < 1:
            raise ValueError(f"warmup and max_graphs must be >= 1, got {warmup} and {max_graphs}")
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.failure: str | None = None
        self._graphs: OrderedDict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, Any]] = OrderedDict()

    def __call__(self, inputs: torch.Tensor) -> Any:
        if inputs.device.type != "cuda":
            raise RuntimeError(f"CapturedCall needs CUDA tensors, got one on {inputs.device}")
        if self.failure is not None:
            return self.fn(inputs)
        key = (tuple(inputs.shape), inputs.stride(), inputs.dtype, inputs.device)
        entry = self._graphs.pop(key, None)
        if entry is None:
            entry = self._capture(inputs)
            if entry is None:
                return self.fn(inputs)
        self._graphs[key] = entry  # most recently used last
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        static_in, graph, static_out = entry
        static_in.copy_(inputs)
        graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)

    @property
    def num_graphs(self) -> int:
        """How many captured graphs are held now."""
        return len(self._graphs)

    def _capture(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.CUDAGraph, Any] | None:
        static_in = torch.empty_strided(inputs.shape, inputs.stride(), dtype=inputs.dtype, device=inputs.device)
        static_in.copy_(inputs)
        # Autocast's weight-cast cache would hand the capture casts made during the warm-up, whose memory is freed
        # when the caller's autocast region ends: the graph would read freed memory. Off while capturing, the casts
        # are recorded in the graph.
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            warm_up(lambda: self.fn(static_in), self.warmup, inputs.device)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    static_out = self.fn(static_in)
            except RuntimeError as err:  # e.g. an operation that waits for the host: run eagerly instead
                self.failure = f"{type(err).__name__}: {err}"
                log.warning("CUDA graph capture failed, running eagerly from now on: %s", self.failure)
                torch.cuda.synchronize(inputs.device)
                return None
        finally:
            torch.set_autocast_cache_enabled(cache)
        return static_in, graph, static_out


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
    graphs = paths.cudagraphs and device.type == "cuda"
    net = compile_module(net.eval(), paths, graphs=False)  # the graphs, if any, are captured below
    anchors_cache: dict[tuple, torch.Tensor] = {}

    def network(images: torch.Tensor):
        # Autocast's weight-cast cache must be off while a graph is captured (the casts are part of the graph).
        with paths.autocast(device, cache_enabled=not graphs), torch.profiler.record_function("effdense.network"):
            return net(images)

    def postprocess(out, hw: tuple[int, int]):
        cls, box = out
        if hw not in anchors_cache:
            anchors_cache[hw] = _anchors_for(task, model, hw, device)
            if anchors_cache[hw].shape[0] != cls.shape[1]:
                raise RuntimeError(f"{anchors_cache[hw].shape[0]} anchors for {cls.shape[1]} predictions at {hw}")
        with torch.profiler.record_function("effdense.postprocess"):
            return task.postprocess(cls, box, anchors_cache[hw], hw)

    whole = not detection or task.postprocess.capturable(device)
    if whole:  # network and post-processing: one call, one graph
        def body(images: torch.Tensor):
            out = network(images)
            return postprocess(out, tuple(images.shape[-2:])) if detection else out

        run = CapturedCall(body) if graphs else body
        info["captured"] = "network and post-processing" if graphs else "nothing"
        captured = run if graphs else None
    else:  # post-processing that waits for the host runs eagerly after the captured network
        graphed_network = CapturedCall(network) if graphs else network

        def run(images: torch.Tensor):
            return postprocess(graphed_network(images), tuple(images.shape[-2:]))

        info["captured"] = "network" if graphs else "nothing"
        captured = graphed_network if graphs else None

    @torch.inference_mode()
    def predict(images: torch.Tensor):
        if paths.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.profiler.record_function("effdense.predict"):
            return run(images)

    predict.captured = captured  # the CapturedCall (None without CUDA graphs): its graphs and any capture failure
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
