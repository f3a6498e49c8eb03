"""Gaussian soft-NMS (``task.module.postprocess.nms=soft``) against effdet 0.4.1's ``soft_nms``: the layer function, the
whole post-processing against effdet's ``generate_detections``, the predictor and the ONNX export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from effdet.anchors import generate_detections
from effdet.soft_nms import batched_soft_nms

from heads import AnchorGenerator, BoxCoder, DetectionPostProcess
from layers.nms import soft_nms
from tasks.config import compose

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"


def _candidates(g: torch.Generator, b: int, k: int, c: int, *, ties: bool = False):
    xy = torch.rand(b, k, 2, generator=g) * 200
    wh = torch.rand(b, k, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], -1)
    scores = torch.rand(b, k, generator=g)
    if ties:  # many equal scores: both take the lowest position first
        scores = (scores * 20).round() / 20 + 0.01
    return boxes, scores, torch.randint(0, c, (b, k), generator=g)


@pytest.mark.parametrize(("seed", "k", "c", "ties"), [(0, 300, 3, False), (1, 400, 1, False), (2, 40, 5, True),
                                                      (3, 300, 2, True), (4, 1, 1, False)])
def test_soft_nms_gives_effdets_detections(seed, k, c, ties):
    g = torch.Generator().manual_seed(seed)
    boxes, scores, labels = _candidates(g, 3, k, c, ties=ties)
    index, taken = soft_nms(boxes, scores, labels, sigma=0.5, score_threshold=0.001, max_detections=100)
    assert index.shape == taken.shape == (3, 100)
    for i in range(3):
        ref_index, ref_scores = batched_soft_nms(boxes[i], scores[i], labels[i], method_gaussian=True, sigma=0.5,
                                                 score_threshold=0.001)
        n = min(100, len(ref_index))
        assert torch.equal(index[i, :n], ref_index[:n])
        assert (index[i, n:] == -1).all() and (taken[i, n:] == 0).all()
        assert torch.allclose(taken[i, :n], ref_scores[:n], atol=1e-5, rtol=0)


def test_soft_nms_hand_computed():
    """Two boxes of one class with IoU 0.5 (the second is decayed by exp(-0.25 / sigma)), a copy of the first with
    another label (untouched), and a box below the threshold (never taken)."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 10], [50, 50, 60, 60]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.0005]])
    labels = torch.tensor([[0, 0, 1, 0]])
    for sigma in (0.5, 0.3):
        index, taken = soft_nms(boxes, scores, labels, sigma=sigma, score_threshold=0.001, max_detections=5)
        decayed = 0.8 * math.exp(-0.25 / sigma)
        order = [0, 2, 1] if decayed < 0.7 else [0, 1, 2]
        assert index[0].tolist() == [*order, -1, -1]
        expected = {0: 0.9, 1: decayed, 2: 0.7}
        assert taken[0, :3].tolist() == pytest.approx([expected[j] for j in order], abs=1e-6)
    # Nothing above the threshold, or nothing at all: no detections.
    index, taken = soft_nms(boxes, scores * 0, labels, sigma=0.5, score_threshold=0.001, max_detections=3)
    assert (index == -1).all() and (taken == 0).all()
    index, _ = soft_nms(boxes[:, :0], scores[:, :0], labels[:, :0], sigma=0.5, score_threshold=0.0, max_detections=3)
    assert index.shape == (1, 3) and (index == -1).all()


def _effdet_detections(logits, deltas, anchors, size, k, max_det):
    """effdet's generate_detections(soft_nms=True) on the same top-k candidates: effdet's box outputs are (ty, tx,
    th, tw) and its anchors (y1, x1, y2, x2)."""
    c = logits.shape[-1]
    _, flat = logits.reshape(-1).topk(k)
    indices, classes = flat // c, flat % c
    h, w = size
    return generate_detections(
        logits.reshape(-1)[flat][:, None], deltas[indices][:, [1, 0, 3, 2]], anchors[:, [1, 0, 3, 2]], indices,
        classes, torch.tensor(1.0), torch.tensor([float(w), float(h)]), max_det_per_image=max_det, soft_nms=True,
    )


def test_postprocess_soft_matches_effdet_generate_detections():
    size = (128, 192)
    anchors = AnchorGenerator(anchor_scale=4.0)({f"p{lvl}": (size[0] >> lvl, size[1] >> lvl) for lvl in range(3, 8)})
    g = torch.Generator().manual_seed(0)
    b, c = 2, 4
    logits = torch.randn(b, anchors.shape[0], c, generator=g) * 2 - 2
    deltas = torch.randn(b, anchors.shape[0], 4, generator=g) * 0.3
    post = DetectionPostProcess(box_coder=BoxCoder(clamp=None), topk=800, max_detections=100, nms="soft")
    out = post(logits, deltas, anchors, size)
    for i in range(b):
        ref = _effdet_detections(logits[i], deltas[i], anchors, size, 800, 100)
        n = int(out["num_detections"][i])
        assert n == int((ref[:, 4] > 0).sum()) == 100
        assert (out["boxes"][i, :n] - ref[:n, :4]).abs().max() <= 0.5
        assert (out["scores"][i, :n] - ref[:n, 4]).abs().max() <= 1e-3
        assert torch.equal(out["labels"][i, :n] + 1, ref[:n, 5].long())
    # Hard NMS keeps fewer of these heavily overlapping candidates, and soft-NMS's best box is hard NMS's.
    hard = DetectionPostProcess(box_coder=BoxCoder(clamp=None), topk=800, max_detections=100)(logits, deltas,
                                                                                               anchors, size)
    assert torch.equal(hard["boxes"][:, 0], out["boxes"][:, 0]) and torch.equal(hard["scores"][:, 0],
                                                                                  out["scores"][:, 0])
    # score_threshold: no detection below it, the rest unchanged.
    cut = DetectionPostProcess(box_coder=BoxCoder(clamp=None), topk=800, nms="soft", score_threshold=0.2)(
        logits, deltas, anchors, size)
    for i in range(b):
        n = int(cut["num_detections"][i])
        assert n == int((out["scores"][i] >= 0.2).sum()) and (cut["scores"][i, :n] >= 0.2).all()
        assert torch.equal(cut["boxes"][i, :n], out["boxes"][i, :n])


def test_soft_nms_options_are_checked():
    coder = BoxCoder()
    with pytest.raises(ValueError, match="nms must be hard or soft"):
        DetectionPostProcess(box_coder=coder, nms="linear")
    with pytest.raises(ValueError, match="soft_nms_sigma"):
        DetectionPostProcess(box_coder=coder, nms="soft", soft_nms_sigma=0)
    with pytest.raises(ValueError, match="hard-NMS kernel"):
        DetectionPostProcess(box_coder=coder, nms="soft", nms_impl="triton")
    assert not DetectionPostProcess(box_coder=coder, nms="soft").capturable("cpu")
    cfg = compose("train", ["data=synthetic", "task.module.postprocess.nms=soft",
                            "task.module.postprocess.soft_nms_sigma=0.3"])
    from hydra.utils import instantiate

    post = instantiate(cfg.task.module.postprocess)
    assert post.nms == "soft" and post.soft_nms_sigma == 0.3 and post.soft_nms_score_threshold == 0.001


def test_predictor_with_soft_nms():
    """A checkpoint written before the option existed predicts with soft-NMS when asked: its best detection is the
    one hard NMS gives, the scores come sorted, and overlapping boxes stay in with lowered scores."""
    import numpy as np

    from inference.predictor import Predictor

    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    hard = Predictor.from_checkpoint(FIXTURES / "detection.ckpt")(image)[0]
    soft = Predictor.from_checkpoint(FIXTURES / "detection.ckpt",
                                     overrides=["task.module.postprocess.nms=soft"])(image)[0]
    assert soft["boxes"][0] == pytest.approx(hard["boxes"][0], abs=1e-4)
    assert soft["scores"][0] == pytest.approx(hard["scores"][0], abs=1e-6)
    assert soft["scores"] == sorted(soft["scores"], reverse=True)
    assert len(soft["scores"]) == 100 >= len(hard["scores"])


@pytest.mark.slow
def test_soft_nms_exports_to_onnx(tmp_path):
    """The rounds unroll into the exported graph: onnxruntime gives PyTorch's detections."""
    from inference.export_runner import export

    cfg = compose("export", [f"ckpt={FIXTURES / 'detection.ckpt'}", "torchscript=false",
                             'config_overrides=["task.module.postprocess.nms=soft","task.module.postprocess.max_detections=20"]'])
    export(cfg, tmp_path)
    check = json.loads((tmp_path / "export.json").read_text())["onnx"]["check"]
    assert check["num_detections_equal"] and check["matched_fraction"] == 1.0
    assert check["boxes"] <= 0.5 and check["scores"] <= 1e-3
