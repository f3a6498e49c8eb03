"""INT8 quantization keeps -inf padding (TensorFlow "same" max pooling, as in EfficientDet-Lite's BiFPN) in float."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from inference.quantize import quantize_int8


def _graph(path):
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], dtype=np.int64), "pads")
    value = numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), "neg_inf")
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["c"], name="/model/conv", pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["c", "pads", "neg_inf"], ["p"], name="/model/pool/Pad", mode="constant"),
        helper.make_node("MaxPool", ["p"], ["out"], name="/model/pool/MaxPool", kernel_shape=[3, 3], strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], [weight, pads, value],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_infinite_padding_stays_float_and_the_rest_is_calibrated(tmp_path, method):
    _graph(tmp_path / "f.onnx")
    rng = np.random.default_rng(1)
    batches = [rng.uniform(0, 255, size=(1, 3, 16, 16)).astype(np.float32) for _ in range(4)]
    quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", batches, method=method)
    model = onnx.load(tmp_path / "q.onnx")
    consumers = {i: n for n in model.graph.node for i in n.input}
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    assert consumers[pad.output[0]].op_type == "MaxPool"  # no QuantizeLinear on the -inf padded tensor
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # the convolution is quantized
    ref = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, {"images": batches[0]})[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"images": batches[0]})[0]
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 0.2 * np.abs(ref).max()
