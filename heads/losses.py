"""Detection losses: sigmoid focal loss (classification) and Huber loss (box regression)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layers.kernels.dispatch import tracing as _tracing
from layers.kernels.dispatch import use_kernel

__all__ = ["DetectionLoss", "huber_loss", "sigmoid_focal_loss"]

IGNORE = -2


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 1.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Elementwise focal loss ``alpha_t * (1 - p_t)**gamma * BCE(logits, targets)`` (Lin et al. 2017).

    ``targets`` are 0/1 (same shape as ``logits``); label smoothing moves the BCE targets toward 0.5
    (``t * (1 - ls) + 0.5 * ls``) and leaves ``p_t`` and ``alpha_t`` on the hard targets. Unreduced,
    computed in float32.
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    p_t = targets * p + (1.0 - targets) * (1.0 - p)
    alpha_t = targets * alpha + (1.0 - targets) * (1.0 - alpha)
    soft = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing if label_smoothing > 0 else targets
    ce = F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    if gamma == 0:
        return alpha_t * ce
    return alpha_t * (1.0 - p_t).pow(gamma) * ce


def huber_loss(input: torch.Tensor, target: torch.Tensor, *, delta: float = 0.1) -> torch.Tensor:
    """Elementwise Huber loss: ``0.5 * e**2`` for ``|e| <= delta``, else ``delta * (|e| - 0.5 * delta)``."""
    err = (input.float() - target.float()).abs()
    quadratic = err.clamp(max=delta)
    return 0.5 * quadratic.square() + delta * (err - quadratic)


class DetectionLoss:
    """EfficientDet loss: focal classification loss + ``box_loss_weight`` x Huber box loss.

    Both are summed over the batch and divided by ``num_positives + 1`` (the box loss also by 4, its
    number of coordinates). Ignored anchors (target -2) contribute nothing; background anchors (-1) have
    an all-zero class target. The box loss covers every coordinate of the positive anchors (``box_mask="positive"``).

    ``box_mask="nonzero"`` weighs it as effdet and the reference implementation do: a coordinate whose target is
    exactly 0 (a box centred on its anchor, or of the anchor's width or height) is left out, so its prediction is not
    pulled towards 0. Then the targets and all three losses equal effdet's (``tests/test_losses.py``). It is not the
    default because it can train much worse where such boxes are common: the built-in synthetic data's shapes line up
    with the anchors, and the demo (``make demo``) ended at AP 0.119 with it against 0.474 without. On COCO's boxes
    exact zeros are rare.

    ``focal_impl`` chooses how the classification loss (without label smoothing) is computed: ``"torch"`` with
    PyTorch operations (about twenty passes over the ``[B, A, C]`` logits, forward and backward), ``"triton"``
    with :func:`layers.kernels.focal_loss.focal_loss` (one pass forward, one backward; needs a CUDA device and Triton),
    ``"auto"`` (default) with the kernel on CUDA once a first kernel has run correctly there, PyTorch otherwise.
    Inside ``torch.compile``, tracing or export both use the PyTorch operations (the compiler fuses them).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        alpha: float = 0.25,
        gamma: float = 1.5,
        label_smoothing: float = 0.0,
        huber_delta: float = 0.1,
        box_loss_weight: float = 50.0,
        focal_impl: str = "auto",
        box_mask: str = "positive",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not gamma >= 0.0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not huber_delta > 0.0:
            raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
        if not box_loss_weight >= 0.0:
            raise ValueError(f"box_loss_weight must be >= 0, got {box_loss_weight}")
        if focal_impl not in ("auto", "torch", "triton"):
            raise ValueError(f"focal_impl must be auto, torch or triton, got {focal_impl!r}")
        if box_mask not in ("positive", "nonzero"):
            raise ValueError(f"box_mask must be positive or nonzero, got {box_mask!r}")
        self.focal_impl = focal_impl
        self.box_mask = box_mask
        self.num_classes = num_classes
        self.alpha = alpha
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.huber_delta = huber_delta
        self.box_loss_weight = box_loss_weight

    def __call__(
        self,
        cls_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        cls_targets: torch.Tensor,
        box_targets: torch.Tensor,
        num_positives: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``cls_logits [B, A, C]``, ``box_deltas [B, A, 4]``, ``cls_targets [B, A]`` (class, -1 background,
        -2 ignore), ``box_targets [B, A, 4]``, ``num_positives`` (scalar, whole batch) ->
        ``{"loss", "cls_loss", "box_loss"}`` float32 scalars."""
        if cls_logits.shape[-1] != self.num_classes:
            raise ValueError(f"cls_logits has {cls_logits.shape[-1]} classes, expected {self.num_classes}")
        normalizer = num_positives.float().sum() + 1.0
        positive = cls_targets >= 0
        backend = self.focal_backend(cls_logits.device)
        if backend == "smoothed":
            cls_loss = self._smoothed_cls_loss(cls_logits, cls_targets, positive) / normalizer
        elif backend == "triton":
            from layers.kernels.focal_loss import focal_loss

            cls_loss = focal_loss(cls_logits, cls_targets, normalizer, alpha=self.alpha, gamma=self.gamma)
        else:
            cls_loss = self._cls_loss(cls_logits, cls_targets, positive) / normalizer
        mask = positive[..., None]
        if self.box_mask == "nonzero":  # effdet's and the reference implementation's weighting (see the docstring)
            mask = mask & (box_targets != 0)
        box = huber_loss(box_deltas, box_targets, delta=self.huber_delta) * mask
        box_loss = box.sum() / (normalizer * 4.0)
        return {
            "loss": cls_loss + self.box_loss_weight * box_loss,
            "cls_loss": cls_loss,
            "box_loss": box_loss,
        }

    def focal_backend(self, device: torch.device) -> str:
        """How the classification loss is computed for logits on ``device``: ``"smoothed"`` (label smoothing:
        PyTorch operations on one-hot targets), ``"triton"`` (:func:`layers.kernels.focal_loss.focal_loss`) or
        ``"torch"`` (PyTorch operations on signed logits); see ``focal_impl``."""
        if self.label_smoothing > 0:
            return "smoothed"
        if self.focal_impl == "torch" or _tracing():
            return "torch"
        from layers.kernels import focal_loss as focal_kernel

        chosen = use_kernel(self.focal_impl, device, focal_kernel, "focal_impl", "'auto' or 'torch'")
        return "triton" if chosen else "torch"

    def _cls_loss(self, cls_logits: torch.Tensor, cls_targets: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """Summed focal loss with hard targets, in few passes over the ``[B, A, C]`` logits.

        With ``s = -logit`` for the target class of a positive anchor and ``s = logit`` everywhere else,
        ``1 - p_t = sigmoid(s)`` and ``BCE = softplus(s)``; the per-element weight is ``alpha`` for a positive,
        ``1 - alpha`` for a negative and 0 on ignored anchors. Equal to :func:`sigmoid_focal_loss` summed over
        the cared anchors (``tests/test_losses.py`` checks it), without building one-hot targets.
        """
        logits = cls_logits.float()
        index = cls_targets.clamp(min=0).unsqueeze(-1)  # [B, A, 1]: each anchor's class (0 when it has none)
        sign = torch.ones_like(logits).scatter_(-1, index, torch.where(positive, -1.0, 1.0).unsqueeze(-1))
        ignored = cls_targets == IGNORE
        weight = torch.full_like(logits, 1.0 - self.alpha).masked_fill_(ignored.unsqueeze(-1), 0.0)
        at_index = torch.where(positive, self.alpha, torch.where(ignored, 0.0, 1.0 - self.alpha))
        weight.scatter_(-1, index, at_index.unsqueeze(-1))
        s = logits * sign
        loss = F.softplus(s) * weight
        if self.gamma != 0:
            loss = loss * torch.sigmoid(s).pow(self.gamma)
        return loss.sum()

    def _smoothed_cls_loss(self, cls_logits, cls_targets, positive) -> torch.Tensor:
        # One-hot float targets built directly (no int64 [B, A, C] intermediate); background rows stay 0.
        onehot = torch.zeros(cls_logits.shape, dtype=torch.float32, device=cls_logits.device)
        onehot.scatter_(-1, cls_targets.clamp(min=0).unsqueeze(-1), positive.unsqueeze(-1).float())
        focal = sigmoid_focal_loss(
            cls_logits, onehot, alpha=self.alpha, gamma=self.gamma, label_smoothing=self.label_smoothing
        )
        cared = (cls_targets != IGNORE)[..., None]
        return (focal * cared).sum()
