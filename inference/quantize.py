"""INT8 static quantization of an exported ONNX graph with ONNX Runtime, calibrated on real images.

The network (every node under ``/model/``: backbone, neck, heads) is quantized in QDQ format: int8 weights per output
channel, uint8 activations with ranges measured on the calibration images. What is outside the network stays in
float32: the input normalisation, flattening the levels, the anchors and, for detection, the box decoding, clipping,
scoring and NMS (for segmentation, the upsampling and argmax). The quantized file keeps the float graph's inputs and
outputs, so it is used the same way.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.files import atomic_path

__all__ = ["CALIBRATION_METHODS", "NETWORK_PREFIX", "compare_outputs", "quantize_int8", "quantized_node_counts"]

log = logging.getLogger(__name__)

#: Calibration methods of ``onnxruntime.quantization.CalibrationMethod`` by their config names.
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: Node-name prefix of the network in an exported graph (the wrapped model is the export module's ``model``).
NETWORK_PREFIX = "/model/"


class _Reader:
    """Feeds calibration batches to ``quantize_static`` (the ``CalibrationDataReader`` protocol)."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": np.ascontiguousarray(batch, dtype=np.float32)}

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _infinite_padding_nodes(graph) -> set[str]:
    """Names of the Pad nodes that pad with an infinite value (TensorFlow "same" max pooling pads with -inf) and of
    the nodes reading their outputs: they stay float, as no 8-bit range holds an infinite value (calibrating it
    would spoil the range of the padded tensor, or fail for histogram methods)."""
    from onnx import numpy_helper

    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    padded: set[str] = set()
    names: set[str] = set()
    for node in graph.node:
        if node.op_type == "Pad" and len(node.input) > 2 and node.input[2] in constants:
            value = numpy_helper.to_array(constants[node.input[2]])
            if value.size and not np.isfinite(value).all():
                names.add(node.name)
                padded.update(node.output)
    names.update(node.name for node in graph.node if padded.intersection(node.input))
    return names


def quantize_int8(float_path: str | Path, out_path: str | Path, batches: Sequence[np.ndarray], *,
                  method: str = "minmax") -> dict[str, Any]:
    """Quantize the float32 ONNX file ``float_path`` into ``out_path``, calibrated on ``batches`` (each ``[B, 3, H, W]``
    float RGB 0..255 at the graph's input size and batch). Returns what was done: node counts and seconds."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calib_method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if not batches:
        raise ValueError("quantization needs at least one calibration image")
    start = time.perf_counter()
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Graph optimisation (constant folding, fusions) before calibration; the symbolic shape inference cannot
        # follow the NMS part of a detection graph, ONNX's own shape inference runs instead.
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        import onnx

        graph = onnx.load(str(prepared)).graph
        kept = _infinite_padding_nodes(graph)
        nodes = [n.name for n in graph.node if n.name.startswith(NETWORK_PREFIX) and n.name not in kept]
        # The calibrator measures every tensor around nodes of the quantized op types, whatever their names: the op
        # types of the float-kept nodes are left out, so the -inf padded tensors are not measured.
        op_types = sorted({n.op_type for n in graph.node if n.name in set(nodes)}
                          - {n.op_type for n in graph.node if n.name in kept})
        if not nodes:
            raise ValueError(f"{float_path}: no network nodes (names under {NETWORK_PREFIX}) to quantize")
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # the quantizer logs each copied bias on the root logger
        try:
            with atomic_path(out_path) as tmp_out:
                quantize_static(
                    str(prepared), str(tmp_out), _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                    op_types_to_quantize=op_types,
                    calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                    extra_options={"CalibTensorRangeSymmetric": False},
                )
        finally:
            root.setLevel(level)
    return {"network_nodes": len(nodes), "seconds": round(time.perf_counter() - start, 1),
            **quantized_node_counts(out_path)}


def quantized_node_counts(path: str | Path) -> dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes and int8 weight tensors an ONNX file holds."""
    import onnx

    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    int8 = sum(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    return {"quantize_nodes": ops.count("QuantizeLinear"), "dequantize_nodes": ops.count("DequantizeLinear"),
            "int8_tensors": int(int8)}


def compare_outputs(float_path: str | Path, int8_path: str | Path, batches: Sequence[np.ndarray], *,
                    kind: str) -> dict[str, Any]:
    """The int8 file against the float32 one on ``batches``: the largest absolute difference per output; for
    detection, the share of float32 detections (score >= 0.3) that the int8 file finds with the same label at IoU
    >= 0.5 (``matched_fraction``, ``None`` without any), the largest box (pixels) and score differences of those
    pairs, and the largest difference of each image's best score (``top_score``)."""
    import onnxruntime as ort

    ref = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in ref.get_outputs()]
    diffs: dict[str, float] = {}
    matched = total = 0
    for batch in batches:
        feed = {"images": np.ascontiguousarray(batch, dtype=np.float32)}
        a, b = dict(zip(names, ref.run(None, feed))), dict(zip(names, q.run(None, feed)))
        if kind == "detection" and "num_detections" in a:
            m, t = _match(a, b, diffs)
            top = float(np.abs(a["scores"][:, 0].astype(np.float64) - b["scores"][:, 0]).max(initial=0.0))
            diffs["top_score"] = max(diffs.get("top_score", 0.0), top)
            matched, total = matched + m, total + t
            continue
        for name in names:
            if name != "labels":
                d = float(np.abs(a[name].astype(np.float64) - b[name]).max(initial=0.0))
                diffs[name] = max(diffs.get(name, 0.0), d)
        if "labels" in a:
            diffs["labels_agree"] = min(diffs.get("labels_agree", 1.0), float((a["labels"] == b["labels"]).mean()))
    if kind == "detection":
        diffs["float32_detections"] = total
        diffs["matched_fraction"] = matched / total if total else None
    return {"images": int(sum(len(b) for b in batches)), **diffs}


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / np.maximum(area + areas - inter, 1e-9)


def _match(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], diffs: dict[str, float], *,
           score: float = 0.3) -> tuple[int, int]:
    """Counts float32 detections (score >= ``score``) and those int8 finds (same label, IoU >= 0.5); the largest box
    (pixels) and score differences of the matched pairs go into ``diffs``."""
    matched = total = 0
    for b in range(ref["boxes"].shape[0]):
        n_ref, n_got = int(ref["num_detections"][b]), int(got["num_detections"][b])
        gb, gl, gs = got["boxes"][b, :n_got], got["labels"][b, :n_got], got["scores"][b, :n_got]
        for i in range(n_ref):
            if ref["scores"][b, i] < score:
                continue
            total += 1
            same = np.flatnonzero(gl == ref["labels"][b, i])
            if not same.size:
                continue
            iou = _iou(ref["boxes"][b, i], gb[same])
            if iou.max() >= 0.5:
                j = same[int(iou.argmax())]
                matched += 1
                diffs["boxes"] = max(diffs.get("boxes", 0.0), float(np.abs(gb[j] - ref["boxes"][b, i]).max()))
                diffs["scores"] = max(diffs.get("scores", 0.0), float(abs(gs[j] - ref["scores"][b, i])))
    return matched, total
