"""The focal classification loss of :class:`heads.DetectionLoss` and its gradient in one pass (Triton).

The eager loss makes about twenty passes over the ``[B, A, C]`` logits between forward and backward (casts, signs,
weights, softplus, sigmoid, power, products and each of their gradients). Here one GPU program per block of anchors reads its logits and
targets and writes the block's loss sum (forward), or writes the gradient with respect to its logits already
multiplied by the incoming gradient and divided by the normalizer (backward): two reads and one write of the
logits in all, in their own dtype, and the gradient is rounded once.

Math (as :meth:`heads.DetectionLoss._cls_loss`): with ``s = -x`` at the target class of a positive anchor and
``s = x`` elsewhere, the element's loss is ``w * softplus(s) * sigmoid(s)**gamma``, ``w`` being ``alpha`` for a
positive, ``1 - alpha`` for a negative and 0 on ignored anchors (target -2). With ``l = log1p(exp(-|s|))``,
``softplus(s) = max(s, 0) + l``, ``log sigmoid(s) = min(s, 0) - l`` and ``1 - sigmoid(s) = exp(-softplus(s))``,
so ``d loss / d s = w * sigmoid(s)**gamma * (sigmoid(s) + gamma * softplus(s) * (1 - sigmoid(s)))``. Everything
is computed in float32; ``log1p`` uses ``log(u) * e / (u - 1)`` with ``u = 1 + e``, accurate for small ``e``. On
a GPU, Triton's ``exp``, ``log`` and division are the fast hardware approximations (a few float32 steps from
PyTorch's). ``gamma == 0`` is the weighted BCE, without ``0 * inf`` at infinite logits. A target class index
``>= C`` (labels that do not fit the number of classes) makes the loss and that anchor's gradient NaN, which the
training loop's non-finite check reports; PyTorch's operations would fail on it instead (a device assert on CUDA).

With ``TRITON_INTERPRET=1`` in the environment before import, the kernel runs on CPU tensors (Triton's interpreter);
the tests check it that way against the eager loss and its autograd gradient.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .dispatch import available, checked, lazy_kernel

__all__ = ["available", "focal_loss", "focal_loss_and_grad", "usable"]

_BLOCK_ROWS = 32  # anchors per program (fewer with over 128 classes)
_BLOCK_ELEMENTS = 4096


def _build(triton, tl):
    @triton.jit
    def focal_kernel(logits_ptr, target_ptr, norm_ptr, scale_ptr, grad_ptr, partial_ptr, rows, alpha, gamma, nan,
                     C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_GRAD: tl.constexpr,
                     GAMMA_ZERO: tl.constexpr):
        block = tl.program_id(0).to(tl.int64)
        row = block * BLOCK_R + tl.arange(0, BLOCK_R)
        col = tl.arange(0, BLOCK_C)
        in_rows = row < rows
        target = tl.load(target_ptr + row, mask=in_rows, other=-2).to(tl.int32)
        inside = in_rows[:, None] & (col[None, :] < C)
        offset = row[:, None] * C + col[None, :]
        x = tl.load(logits_ptr + offset, mask=inside, other=0.0).to(tl.float32)
        hit = col[None, :] == target[:, None]  # the target class of a positive anchor (targets -1, -2 hit nothing)
        s = tl.where(hit, -x, x)
        w = tl.where(hit, alpha, 1.0 - alpha)
        w = tl.where(inside & (target[:, None] != -2), w, 0.0)
        w = tl.where(inside & (target[:, None] >= C), nan, w)  # a class index out of range: NaN loss and gradient
        e = tl.exp(-tl.abs(s))
        u = 1.0 + e
        l1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        softplus = tl.maximum(s, 0.0) + l1p
        log_sig = tl.minimum(s, 0.0) - l1p
        sig = tl.exp(log_sig)
        if GAMMA_ZERO:  # weighted BCE (no 0 * inf where a logit is infinite)
            loss = w * softplus
        else:
            modulator = tl.exp(gamma * log_sig)  # sigmoid(s) ** gamma
            loss = w * softplus * modulator
        if WRITE_GRAD:  # d (sum / normalizer) / d x, times the incoming gradient
            scale = tl.load(scale_ptr) / tl.load(norm_ptr)
            if GAMMA_ZERO:
                ds = w * sig
            else:
                ds = w * modulator * (sig + gamma * softplus * tl.exp(-softplus))
            grad = tl.where(hit, -ds, ds) * scale
            tl.store(grad_ptr + offset, grad.to(grad_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=inside)
        else:
            tl.store(partial_ptr + block, tl.sum(tl.sum(loss, axis=1), axis=0))

    return focal_kernel


_triton = lazy_kernel(_build)


def focal_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, normalizer: torch.Tensor, *, alpha: float, gamma: float,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``logits [..., C]`` (any float dtype), ``targets [...]`` (class index, -1 background, -2 ignored),
    ``normalizer`` (a positive one-element tensor) -> ``(loss, None)``: the summed focal loss divided by the
    normalizer (float32 scalar); or, with ``grad_scale`` (a one-element tensor), ``(None, grad)``: the loss's
    gradient with respect to ``logits`` times ``grad_scale`` (same dtype and shape as ``logits``, contiguous),
    computed in float32 and rounded once."""
    found = _triton()
    if found is None:
        raise RuntimeError("focal_loss_and_grad needs Triton (pip install triton)")
    triton, kernel = found
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits [..., C] and targets [...] expected, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if not logits.is_floating_point() or targets.is_floating_point():
        raise ValueError(f"float logits and integer targets expected, got {logits.dtype} and {targets.dtype}")
    classes, rows = logits.shape[-1], targets.numel()
    logits = logits.contiguous()
    device = logits.device
    normalizer = normalizer.reshape(1).to(device=device, dtype=torch.float32)
    with_grad = grad_scale is not None
    scale = grad_scale.reshape(1).to(device=device, dtype=torch.float32) if with_grad else normalizer
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if with_grad else None
    block_c = triton.next_power_of_2(classes)
    block_r = max(1, min(_BLOCK_ROWS, _BLOCK_ELEMENTS // block_c))  # about 4096 logits per program
    programs = triton.cdiv(rows, block_r)
    # The backward pass writes no loss: the normaliser stands in for the unused per-block buffer.
    if with_grad:
        partial = normalizer
    else:
        partial = torch.empty(programs, dtype=torch.float32, device=device) if programs else torch.zeros(
            1, dtype=torch.float32, device=device)
    if programs:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            kernel[(programs,)](
                logits, targets.contiguous(), normalizer, scale, logits if grad is None else grad, partial, rows,
                float(alpha), float(gamma), math.nan, C=classes, BLOCK_R=block_r, BLOCK_C=block_c,
                WRITE_GRAD=with_grad, GAMMA_ZERO=float(gamma) == 0.0, num_warps=4 if block_c <= 128 else 8,
            )
    if with_grad:
        return None, grad
    return partial.sum() / normalizer[0], None


class _FocalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, normalizer, alpha, gamma):
        loss, _ = focal_loss_and_grad(logits, targets, normalizer, alpha=alpha, gamma=gamma)
        ctx.save_for_backward(logits, targets, normalizer)
        ctx.alpha, ctx.gamma = alpha, gamma
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        logits, targets, normalizer = ctx.saved_tensors
        _, grad = focal_loss_and_grad(logits, targets, normalizer, alpha=ctx.alpha, gamma=ctx.gamma,
                                      grad_scale=grad_loss)
        return grad, None, None, None, None


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer: torch.Tensor, *, alpha: float,
               gamma: float) -> torch.Tensor:
    """The summed focal loss divided by ``normalizer``, differentiable with respect to ``logits`` (the backward
    pass reads the logits again and writes their gradient in one pass, see the module docstring; no double
    backward)."""
    return _FocalLoss.apply(logits, targets, normalizer, alpha, gamma)


def _probe(device: torch.device) -> bool:
    """The loss and its gradient on a small case (every kind of target, logits from -20 to 20) against PyTorch's
    operations and autograd."""
    x = torch.linspace(-20.0, 20.0, 40, device=device).reshape(8, 5)
    t = torch.tensor([1, -1, -2, 4, 0, -1, 3, 2], device=device)
    norm, scale = torch.tensor(3.0, device=device), torch.tensor(0.5, device=device)
    loss, _ = focal_loss_and_grad(x, t, norm, alpha=0.25, gamma=1.5)
    _, grad = focal_loss_and_grad(x, t, norm, alpha=0.25, gamma=1.5, grad_scale=scale)
    hit = torch.nn.functional.one_hot(t.clamp(min=0), 5).bool() & (t >= 0)[:, None]
    w = torch.where(hit, 0.25, 0.75) * (t != -2)[:, None]
    ref_x = x.clone().requires_grad_()
    s = torch.where(hit, -ref_x, ref_x)
    ref = (w * torch.nn.functional.softplus(s) * torch.sigmoid(s) ** 1.5).sum() / norm
    (ref_grad,) = torch.autograd.grad(ref * scale, ref_x)
    # Triton's exp, log and division on a GPU are the fast hardware approximations: a few float32 steps apart.
    return bool(torch.isclose(loss, ref.detach(), rtol=1e-4)) and grad is not None and bool(
        torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7))


def usable(device: torch.device) -> bool:
    """:func:`available`, and a first kernel built and run on ``device`` gave the right answer (checked once per
    device; otherwise a warning says why and the answer is False)."""
    return checked("focal loss", device, _probe, "the eager focal loss")
