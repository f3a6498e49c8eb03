"""The one-pass focal loss kernel (layers.kernels.focal_loss) gives the eager loss and its autograd gradient.

Without a GPU it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET before Triton is imported).
"""

from __future__ import annotations

import pytest
import torch

from heads.losses import IGNORE, DetectionLoss
from layers.kernels import dispatch as _triton
from layers.kernels import focal_loss as focal_kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not focal_kernel.available(DEVICE), reason="needs Triton")
# Triton's interpreter computes exp, log and division exactly rounded; on a GPU they are the fast hardware
# approximations, a few float32 steps from the PyTorch operations.
RTOL = 2e-6 if DEVICE.type == "cpu" else 2e-5


def _case(seed: int, b: int, a: int, c: int, *, scale: float = 4.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, a, c, generator=g) * scale).to(dtype)
    targets = torch.randint(0, c, (b, a), generator=g)
    kind = torch.rand(b, a, generator=g)
    targets[kind < 0.5] = -1  # background
    targets[kind > 0.85] = IGNORE
    return logits.to(DEVICE), targets.to(DEVICE)


def _eager(logits, targets, normalizer, alpha, gamma, upstream):
    x = logits.detach().clone().requires_grad_()
    loss = DetectionLoss(num_classes=x.shape[-1], alpha=alpha, gamma=gamma, focal_impl="torch")._cls_loss(
        x, targets, targets >= 0) / normalizer
    loss.backward(upstream)
    return loss.detach(), x.grad


def _kernel(logits, targets, normalizer, alpha, gamma, upstream):
    x = logits.detach().clone().requires_grad_()
    loss = focal_kernel.focal_loss(x, targets, normalizer, alpha=alpha, gamma=gamma)
    loss.backward(upstream)
    return loss.detach(), x.grad


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 1.5), (0.25, 0.0), (0.6, 2.0), (0.0, 1.5)])
@pytest.mark.parametrize("shape", [(2, 77, 5), (1, 40, 90), (3, 33, 1), (1, 9, 300)])  # rows not a block multiple
def test_loss_and_gradient_equal_the_eager_ones_in_float32(alpha, gamma, shape):
    logits, targets = _case(sum(shape), *shape)
    normalizer = torch.tensor(7.0, device=DEVICE)
    upstream = torch.tensor(0.37, device=DEVICE)
    ref_loss, ref_grad = _eager(logits, targets, normalizer, alpha, gamma, upstream)
    loss, grad = _kernel(logits, targets, normalizer, alpha, gamma, upstream)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=1e-7)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=1e-9)
    ignored = targets == IGNORE
    assert (grad[ignored] == 0).all() and (grad[~ignored].abs() > 0).any()


def test_extreme_logits_stay_finite_and_exact():
    x = torch.tensor([[[-100.0, -30.0, -1e-4, 0.0, 1e-4, 30.0, 100.0, -17.0]]], device=DEVICE).repeat(1, 3, 1)
    targets = torch.tensor([[1, 6, -1]], device=DEVICE)  # positives at -30 and +100, a background row
    one = torch.tensor(1.0, device=DEVICE)
    ref_loss, ref_grad = _eager(x, targets, one, 0.25, 1.5, one)
    loss, grad = _kernel(x, targets, one, 0.25, 1.5, one)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5 if DEVICE.type == "cpu" else 1e-4, atol=1e-12)


def test_bfloat16_logits_get_a_bfloat16_gradient_within_one_rounding():
    logits, targets = _case(3, 2, 200, 9, dtype=torch.bfloat16)
    normalizer = torch.tensor(11.0, device=DEVICE)
    upstream = torch.tensor(1.0, device=DEVICE)
    ref_loss, ref_grad = _eager(logits, targets, normalizer, 0.25, 1.5, upstream)
    loss, grad = _kernel(logits, targets, normalizer, 0.25, 1.5, upstream)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0.0)
    # The eager gradient is cast to bf16 once at the end; so is the kernel's: they differ by at most one bf16 step.
    step = torch.finfo(torch.bfloat16).eps * ref_grad.float().abs()
    assert ((grad.float() - ref_grad.float()).abs() <= step + 1e-30).all()


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE.type == "cpu", reason="Triton's interpreter truncates float32 to bfloat16; a GPU rounds to nearest")),
    torch.float16,
])
def test_a_low_precision_gradient_is_the_float32_one_rounded_once(dtype):
    logits, targets = _case(8, 2, 70, 6, dtype=dtype)
    n, up = torch.tensor(5.0, device=DEVICE), torch.tensor(0.3, device=DEVICE)
    _, grad = _kernel(logits, targets, n, 0.25, 1.5, up)
    _, grad32 = _kernel(logits.float(), targets, n, 0.25, 1.5, up)  # the same values, exactly, in float32
    assert grad.dtype == dtype and torch.equal(grad, grad32.to(dtype))  # round to nearest, once


def test_any_layout_and_integer_type_of_the_inputs():
    logits, targets = _case(9, 3, 40, 6)
    n, up = torch.tensor(2.0, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    ref_loss, ref_grad = _kernel(logits, targets, n, 0.25, 1.5, up)
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, not contiguous
    assert not strided.is_contiguous()
    loss, grad = _kernel(strided, targets.int(), n, 0.25, 1.5, up)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def test_gamma_zero_with_infinite_logits_and_class_indices_out_of_range():
    x = torch.tensor([[[-float("inf"), 0.5, float("inf")], [-float("inf"), 1.0, 2.0]]], device=DEVICE)
    targets = torch.tensor([[-1, IGNORE]], device=DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    ref_loss, ref_grad = _eager(x, targets, one, 0.25, 0.0, one)
    loss, grad = _kernel(x, targets, one, 0.25, 0.0, one)
    assert torch.equal(loss, ref_loss) and ref_loss == float("inf")  # the eager loss: inf, not NaN
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=0.0)
    assert torch.isfinite(grad).all()
    # A class index >= C (labels that do not fit num_classes) makes the loss and that anchor's gradient NaN, so the
    # training loop's non-finite check sees it; PyTorch's scatter would fail on it (on CUDA, a device assert).
    logits, targets = _case(10, 1, 20, 4)
    targets[0, 3] = 4
    loss, grad = _kernel(logits, targets, one, 0.25, 1.5, one)
    assert loss.isnan() and grad[0, 3].isnan().all() and torch.isfinite(grad[0, :3]).all()


def test_no_gradient_work_without_grad_and_a_retained_graph_gives_the_same_gradient_twice():
    logits, targets = _case(5, 2, 50, 4)
    n = torch.tensor(3.0, device=DEVICE)
    with torch.no_grad():
        plain = focal_kernel.focal_loss(logits, targets, n, alpha=0.25, gamma=1.5)
    x = logits.clone().requires_grad_()
    loss = focal_kernel.focal_loss(x, targets, n, alpha=0.25, gamma=1.5)
    assert torch.equal(loss.detach(), plain)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, second)
    empty = focal_kernel.focal_loss(torch.zeros(0, 0, 3, device=DEVICE, requires_grad=True),
                                    torch.zeros(0, 0, dtype=torch.long, device=DEVICE), n, alpha=0.25, gamma=1.5)
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="logits"):
        focal_kernel.focal_loss(logits, targets[:, :10], n, alpha=0.25, gamma=1.5)


def _detection_inputs(seed: int):
    logits, targets = _case(seed, 2, 60, 6)
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(2, 60, 4, generator=g).to(DEVICE)
    box_targets = torch.randn(2, 60, 4, generator=g).to(DEVICE)
    return logits, deltas, targets, box_targets, (targets >= 0).sum()


def test_detection_loss_with_the_kernel_equals_the_torch_one():
    logits, deltas, targets, box_targets, num_pos = _detection_inputs(11)
    results = {}
    for impl in ("torch", "triton"):
        x = logits.clone().requires_grad_()
        d = deltas.clone().requires_grad_()
        out = DetectionLoss(num_classes=6, focal_impl=impl)(x, d, targets, box_targets, num_pos)
        out["loss"].backward()
        results[impl] = (out, x.grad, d.grad)
    (ref, ref_gx, ref_gd), (got, gx, gd) = results["torch"], results["triton"]
    for key in ("loss", "cls_loss", "box_loss"):
        torch.testing.assert_close(got[key], ref[key], rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(gx, ref_gx, rtol=RTOL, atol=1e-9)
    assert torch.equal(gd, ref_gd)


def test_auto_uses_the_kernel_on_cuda_only_and_falls_back_when_it_cannot_run(monkeypatch, refused_kernel):
    calls = []
    real, real_both = focal_kernel.focal_loss, focal_kernel.focal_loss_and_grad

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(focal_kernel, "focal_loss", counting)
    inputs = _detection_inputs(2)
    DetectionLoss(num_classes=6)(*inputs)
    assert len(calls) == (1 if DEVICE.type == "cuda" else 0)  # auto: the kernel on CUDA, PyTorch on the CPU
    DetectionLoss(num_classes=6, focal_impl="triton")(*inputs)
    assert len(calls) == (2 if DEVICE.type == "cuda" else 1)

    monkeypatch.setattr(_triton, "_CHECKED", {})
    assert focal_kernel.usable(DEVICE)  # the interpreter on the CPU, the GPU where there is one
    refused_kernel(focal_kernel, "focal_loss_and_grad", DEVICE,
                   f"focal loss kernel cannot run on {DEVICE} .*no C compiler.*eager focal loss")

    def slightly_wrong_gradient(*args, **kwargs):
        loss, grad = real_both(*args, **kwargs)
        return loss, None if grad is None else grad * 1.01

    refused_kernel(focal_kernel, "focal_loss_and_grad", DEVICE,
                   f"focal loss kernel gave a wrong answer on {DEVICE}", slightly_wrong_gradient)


def test_compiled_loss_uses_torch_operations_and_bad_choices_raise(monkeypatch):
    inputs = _detection_inputs(4)
    loss = DetectionLoss(num_classes=6, focal_impl="triton")
    ref = DetectionLoss(num_classes=6, focal_impl="torch")(*inputs)["loss"]

    def refuse(*args, **kwargs):
        raise AssertionError("the kernel must not be launched inside torch.compile")

    monkeypatch.setattr(focal_kernel, "focal_loss", refuse)
    compiled = torch.compile(lambda *a: loss(*a)["loss"], backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), ref)
    with pytest.raises(ValueError, match="focal_impl must be"):
        DetectionLoss(num_classes=6, focal_impl="fused")
    monkeypatch.setattr(focal_kernel, "available", lambda device: False)
    with pytest.raises(RuntimeError, match="focal_impl='triton' needs a CUDA device"):
        loss(*inputs)


def test_a_detection_task_trains_through_the_kernel_with_the_same_gradients(monkeypatch):
    """The task's loss (anchors, target assignment, both losses) with the kernel: the same loss and parameter
    gradients as with the PyTorch focal loss, and the config key reaches the loss."""
    # on a GPU: full float32 convolutions (no TF32) with deterministic algorithms, so that only the loss differs
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    from tasks.config import compose
    from tasks.runner import build_model, build_task

    small = ["image_size=64", "model.image_size=64", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
             "backbone.drop_path_rate=0.0", "data.num_classes=3"]
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g),
             "boxes": torch.tensor([[[4.0, 4, 40, 30], [20, 10, 60, 60]], [[0.0, 0, 30, 50], [0, 0, 0, 0]]]),
             "labels": torch.tensor([[0, 2], [1, -1]])}
    grads = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = compose("benchmark", [*small, f"task.module.loss.focal_impl={impl}"])
        task = build_task(cfg, build_model(cfg)).to(DEVICE).train()
        assert task.loss.focal_impl == impl
        losses, _ = task._losses({k: v.to(DEVICE) for k, v in batch.items()})
        losses["loss"].backward()
        grads[impl] = (losses["loss"].detach(), {n: p.grad for n, p in task.model.named_parameters()
                                                 if p.grad is not None})
    (ref_loss, ref), (loss, got) = grads["torch"], grads["triton"]
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=1e-7)
    assert ref.keys() == got.keys() and len(ref) > 10
    # float32 rounding, summed through the whole network (some gradients cancel to ~1e-7): every entry within
    # 5 x RTOL (1e-5 on the CPU, 1e-4 on a GPU with its fast exp/log) of the largest gradient entry, and the whole
    # gradient within that in relative L2 norm
    tol = 5 * RTOL
    largest = max(r.abs().max() for r in ref.values())
    for name in ref:
        assert (got[name] - ref[name]).abs().max() <= tol * largest, name
    flat_ref, flat = torch.cat([r.flatten() for r in ref.values()]), torch.cat([got[n].flatten() for n in ref])
    assert (flat - flat_ref).norm() <= tol * flat_ref.norm()
