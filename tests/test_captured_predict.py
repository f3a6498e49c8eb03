"""A predict call captured as a CUDA graph gives what the eager call gives."""

from __future__ import annotations

import copy

import pytest
import torch

from tasks.config import compose
from tasks.runner import build_model, build_task


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_captured_predict_equals_eager_predict(monkeypatch, compiled):
    """On CUDA, prepare_predictor replays network and post-processing (the Triton NMS) as one CUDA graph per input
    shape. Its detections are those of the eager pipeline with torchvision's NMS, and each call's results stay valid
    after later calls (they are copies, not the graph's buffers)."""
    from heads.postprocess import DetectionPostProcess
    from inference.fast_paths import FastPaths, prepare_predictor

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    cfg = compose("benchmark", ["image_size=256"])
    task = build_task(cfg, build_model(cfg)).eval()
    with torch.no_grad():
        task.model.head.class_net.predict.pointwise.weight.mul_(100.0)  # class logits that depend on the image
    assert task.postprocess.capturable("cuda")
    graphed, info = prepare_predictor(task, FastPaths(precision="fp32", compile=compiled), "cuda")
    assert info["captured"] == "network and post-processing"
    plain_task = copy.deepcopy(task)
    plain_task.postprocess = DetectionPostProcess(
        box_coder=task.postprocess.box_coder, topk=task.postprocess.topk, max_detections=task.postprocess.max_detections,
        score_threshold=task.postprocess.score_threshold, iou_threshold=task.postprocess.iou_threshold, nms_impl="torchvision",
    )
    plain, info = prepare_predictor(plain_task, FastPaths(precision="fp32", compile=False, cudagraphs=False), "cuda")
    assert info["captured"] == "nothing"
    xs = [torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(s)).cuda() for s in range(3)]
    first = graphed(xs[0])
    outs = [graphed(x) for x in xs[1:]] + [graphed(xs[0][:1])]  # a second shape: a second graph
    for out, x in zip([first, *outs], [*xs, xs[0][:1]]):
        ref = plain(x)
        assert torch.equal(out["num_detections"], ref["num_detections"])
        assert (out["num_detections"] > 0).all()
        torch.testing.assert_close(out["scores"], ref["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(out["boxes"], ref["boxes"], rtol=0, atol=1e-2)
        assert (out["labels"] == ref["labels"]).float().mean() > 0.98  # near-tied scores may swap
    assert not torch.equal(first["scores"], outs[0]["scores"])
    assert graphed.captured.failure is None and graphed.captured.num_graphs == 2  # really replayed, two shapes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_segmentation_predict_equals_eager():
    from inference.fast_paths import FastPaths, prepare_predictor

    torch.manual_seed(0)
    cfg = compose("benchmark", ["task=segmentation", "backbone=b0", "image_size=256"])
    task = build_task(cfg, build_model(cfg)).eval()
    graphed, info = prepare_predictor(task, FastPaths(precision="fp32", compile=False), "cuda")
    assert info["captured"] == "network and post-processing"
    plain, _ = prepare_predictor(task, FastPaths(precision="fp32", compile=False, cudagraphs=False), "cuda")
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)).cuda()
    a, b = graphed(x), plain(x)
    assert a.shape == (2, 256, 256) and (a == b).float().mean() > 0.999
    assert graphed.captured.failure is None and graphed.captured.num_graphs == 1
