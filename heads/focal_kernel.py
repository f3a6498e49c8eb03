"""The focal classification loss of :class:`heads.DetectionLoss` and its gradient in one pass (Triton).

The eager loss makes about twenty passes over the ``[B, A, C]`` logits between forward and backward (casts, signs,
weights, softplus, sigmoid, power, products and each of their gradients): at D0, batch 32, that is 141 M logits
and some 30 GB of memory traffic per training step. Here one GPU program per block of anchors reads its logits and
targets and writes the block's loss sum (forward), or writes the gradient with respect to its logits already
multiplied by the incoming gradient and divided by the normalizer (backward): two reads and one write of the
logits in all, in their own dtype, and the gradient is rounded once.

Math (as :meth:`heads.DetectionLoss._cls_loss`): with ``s = -x`` at the target class of a positive anchor and
``s = x`` elsewhere, the element's loss is ``w * softplus(s) * sigmoid(s)**gamma``, ``w`` being ``alpha`` for a
positive, ``1 - alpha`` for a negative and 0 on ignored anchors (target -2). With ``l = log1p(exp(-|s|))``,
``softplus(s) = max(s, 0) + l``, ``log sigmoid(s) = min(s, 0) - l`` and ``1 - sigmoid(s) = exp(-softplus(s))``,
so ``d loss / d s = w * sigmoid(s)**gamma * (sigmoid(s) + gamma * softplus(s) * (1 - sigmoid(s)))``. Everything
is computed in float32; ``log1p`` uses ``log(u) * e / (u - 1)`` with ``u = 1 + e``, exact to float32 rounding for
small ``e``.

With ``TRITON_INTERPRET=1`` in the environment before import, the kernel runs on CPU tensors (Triton's interpreter);
the tests check it that way against the eager loss and its autograd gradient.
"""

from __future__ import annotations

import functools

import torch

from ._triton import available, checked, triton_modules

__all__ = ["available", "focal_loss", "focal_loss_and_grad", "usable"]

_BLOCK_ROWS = 32  # anchors per program


@functools.cache
def _triton():
    found = triton_modules()
    if found is None:
        return None
    triton, tl = found

    @triton.jit
    def focal_kernel(logits_ptr, target_ptr, norm_ptr, scale_ptr, grad_ptr, partial_ptr, rows, alpha, gamma,
                     C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_GRAD: tl.constexpr):
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
        e = tl.exp(-tl.abs(s))
        u = 1.0 + e
        l1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        softplus = tl.maximum(s, 0.0) + l1p
        log_sig = tl.minimum(s, 0.0) - l1p
        sig = tl.exp(log_sig)
        modulator = tl.exp(gamma * log_sig)  # sigmoid(s) ** gamma; 1 when gamma == 0
        loss = w * softplus * modulator
        if WRITE_GRAD:  # d (sum / normalizer) / d x, times the incoming gradient
            scale = tl.load(scale_ptr) / tl.load(norm_ptr)
            ds = w * modulator * (sig + gamma * softplus * tl.exp(-softplus))
            grad = tl.where(hit, -ds, ds) * scale
            tl.store(grad_ptr + offset, grad.to(grad_ptr.dtype.element_ty), mask=inside)
        else:
            tl.store(partial_ptr + block, tl.sum(tl.sum(loss, axis=1), axis=0))

    return triton, focal_kernel


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
    programs = triton.cdiv(rows, _BLOCK_ROWS)
    partial = torch.zeros(1, dtype=torch.float32, device=device) if with_grad or programs == 0 else torch.empty(
        programs, dtype=torch.float32, device=device)
    if programs:
        block_c = triton.next_power_of_2(classes)
        kernel[(programs,)](
            logits, targets.contiguous(), normalizer, scale, logits if grad is None else grad, partial, rows,
            float(alpha), float(gamma), C=classes, BLOCK_R=_BLOCK_ROWS, BLOCK_C=block_c, WRITE_GRAD=with_grad,
            num_warps=4 if block_c <= 128 else 8,
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
    x = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -4.0], [1.0, 1.0, 1.0]], device=device)
    t = torch.tensor([1, -1, -2], device=device)
    one = torch.ones((), device=device)
    loss, _ = focal_loss_and_grad(x, t, one, alpha=0.25, gamma=1.5)
    _, grad = focal_loss_and_grad(x, t, one, alpha=0.25, gamma=1.5, grad_scale=one)
    s = torch.where(torch.nn.functional.one_hot(t.clamp(min=0), 3).bool() & (t >= 0)[:, None], -x, x)
    w = torch.tensor([[0.75, 0.25, 0.75], [0.75, 0.75, 0.75], [0.0, 0.0, 0.0]], device=device)
    ref = (w * torch.nn.functional.softplus(s) * torch.sigmoid(s) ** 1.5).sum()
    return bool(torch.isclose(loss, ref, rtol=1e-5)) and grad is not None and bool(torch.isfinite(grad).all())


def usable(device: torch.device) -> bool:
    """:func:`available`, and a first kernel built and run on ``device`` gave the right answer (checked once per
    device; otherwise a warning says why and the answer is False)."""
    return checked("focal loss", device, lambda d: _probe(d), "the eager focal loss")  # late binding for tests
