"""Fast inference paths keep accuracy: float32 paths change rounding only, bf16 stays within a stated tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import box_iou

from heads import flatten_levels
from inference.fast_paths import FastPaths, optimize_model, prepare_predictor
from tasks.config import compose
from tasks.runner import build_model, build_task

#: bf16 autocast against float32, for a D0 detector (stated in docs/benchmarks.md); the detections of a trained
#: model are compared in tests/test_overfit.py.
BF16_LOGIT_TOL = 0.15  # absolute, class logits (their spread here: std about 1.9)
BF16_SCORE_TOL = 0.02  # absolute, sorted detection scores


def _make_task():
    torch.manual_seed(0)
    cfg = compose("benchmark", ["image_size=256"])
    task = build_task(cfg, build_model(cfg)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-like statistics and a spread of class scores, so ranks mean something
        for m in task.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        predict = task.model.head.class_net.predict.pointwise
        predict.weight.mul_(100.0)  # class logits that depend on the image (initialised near-constant)
        predict.bias.copy_(torch.randn(predict.bias.shape, generator=g) - 3.0)
    return task


def _raw(model, x):
    with torch.no_grad():
        out = model(x)
    return flatten_levels(out.cls_logits, 90), flatten_levels(out.box_deltas, 4)


def _matched(ref: dict, out: dict) -> float:
    found = total = 0
    for i in range(ref["scores"].shape[0]):
        n = int(ref["num_detections"][i])
        iou = box_iou(ref["boxes"][i, :n], out["boxes"][i])
        same = ref["labels"][i, :n, None] == out["labels"][i][None]
        found += int(((iou > 0.8) & same).any(1).sum())
        total += n
    return found / total


def test_float32_fast_paths_change_rounding_only(task):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    fast, info = optimize_model(task.model, FastPaths(precision="fp32"), "cpu")
    assert info["folded_norms"] > 100 and info["unfolded_norms"] == 0
    # The backbone's activations are in place again in the inference copy (48 in EfficientNet-B0), and only there.
    assert info["inplace_activations"] == 48
    assert sum(getattr(m, "inplace", False) is True for m in fast.modules()) == 48
    assert not any(getattr(m, "inplace", False) is True for m in task.model.modules())
    cls, box = _raw(task.model, x)
    cls_fast, box_fast = _raw(fast, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cls_fast, cls, rtol=0, atol=1e-4)
    torch.testing.assert_close(box_fast, box, rtol=0, atol=1e-4)

    plain, info = prepare_predictor(task, FastPaths(channels_last=False, fold_bn=False, precision="fp32"), "cpu")
    assert info["inplace_activations"] == 48
    quick, _ = prepare_predictor(task, FastPaths(precision="fp32"), "cpu")
    ref, out = plain(x), quick(x)
    sorted_diff = (ref["scores"].sort(1).values - out["scores"].sort(1).values).abs().max()
    assert sorted_diff < 1e-4
    # (Which boxes fill the top 100 is not compared here: this untrained model's top scores are near-tied.
    # tests/test_overfit.py compares detections of a trained model.)


def test_bf16_logits_within_tolerance_and_detections_follow(task):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    model = copy.deepcopy(task.model)
    cls, _ = _raw(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls_bf16, _ = _raw(model, x)
    assert cls.std() > 1.0  # logits with a spread, against which the tolerance means something
    assert (cls_bf16.float() - cls).abs().max() < BF16_LOGIT_TOL
    ref, _ = prepare_predictor(task, FastPaths(precision="fp32"), "cpu")
    bf16, info = prepare_predictor(task, FastPaths(precision="bf16"), "cpu")
    assert info["paths"]["precision"] == "bf16"
    a, b = ref(x), bf16(x)
    assert (a["scores"].sort(1).values - b["scores"].sort(1).values).abs().max() < BF16_SCORE_TOL


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cuda_needs_native_bf16(monkeypatch, native):
    """A GPU that only emulates bfloat16 (before compute capability 8.0) is slower in it than in float32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    assert FastPaths().resolve("cuda").precision == ("bf16" if native else "fp32")
    assert FastPaths(precision="bf16").resolve("cuda").precision == "bf16"  # asked for explicitly: used as given


def test_fast_path_choices_per_device():
    cpu = FastPaths().resolve("cpu")
    assert (cpu.precision, cpu.compile, cpu.cudagraphs, cpu.channels_last, cpu.fold_bn) == ("fp32", False, False, True, True)
    assert FastPaths(precision="bf16", compile=True).resolve("cpu").cudagraphs is False
    with pytest.raises(ValueError, match="precision"):
        FastPaths(precision="int8").resolve("cpu")
    with pytest.raises(TypeError, match="compile"):
        FastPaths(compile="sometimes").resolve("cpu")


@pytest.fixture(scope="module")
def task():
    return _make_task()


def test_predictor_applies_fast_paths_to_a_copy(task):
    import numpy as np

    from inference.predictor import Predictor

    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    fast = Predictor(task, config={}, device="cpu")
    exact = Predictor(task, config={}, device="cpu",
                      fast=FastPaths(fold_bn=False, channels_last=False, precision="fp32"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.task.model.modules())
    assert exact.task is task
    state = task.model.state_dict()  # the caller's task is unchanged
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    a, b = fast([image])[0], exact([image])[0]
    assert len(a["scores"]) == len(b["scores"]) > 0
    np.testing.assert_allclose(sorted(a["scores"]), sorted(b["scores"]), atol=1e-4)
