"""A whole training step (forward, target assignment, loss, backward, optimizer step) captured as one CUDA graph.

An EfficientDet training step launches thousands of small kernels (depthwise convolutions, norms, activations
and their gradients). On a fast GPU the CPU cannot launch them as quickly as the GPU runs them, so the step is
bound by launch overhead, not by arithmetic. Captured once as a CUDA graph, the step is replayed with a single
launch. That needs static shapes and no host synchronisation anywhere in the step; this project's target
assignment (:class:`heads.TargetAssigner`) and loss are written to have none (ground truth padded to a fixed
number of boxes per image, labels -1 for padding).

Limits of a captured step (the price of one launch per step):

- inputs keep the shapes of the example (copy each batch into the static inputs: :meth:`GraphedTrainStep.__call__`
  does it);
- hyper-parameters read as Python numbers at capture time stay fixed: a learning-rate schedule that changes
  ``param_group["lr"]`` has no effect on the replayed graph unless the optimizer takes ``lr`` as a tensor;
- the capture runs ``warmup`` real steps first (on a side stream, as CUDA graph capture requires), which update
  the parameters like any other step;
- the gradients live in the graph's memory: do not call ``optimizer.zero_grad(set_to_none=True)`` between
  replays (each replay overwrites them anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["GraphedTrainStep", "warm_up"]


def warm_up(fn: Callable[[], object], times: int, device: torch.device | None = None) -> None:
    """Call ``fn`` ``times`` times on a side stream, then make the current stream wait for them: what the calls
    before a CUDA graph capture must do (lazily created state, cuDNN autotuning and compilation happen there)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    current.wait_stream(side)


class GraphedTrainStep:
    """``loss_fn(*inputs) -> scalar loss``, its backward pass and ``optimizer.step()`` as one replayable CUDA graph.

    Args:
        loss_fn: computes the loss from the inputs (and any module it closes over); run under autocast it must use
            ``cache_enabled=False`` (cached casts would outlive the capture).
        optimizer: steps the parameters that ``loss_fn`` trains.
        example_inputs: CUDA tensors with the shapes and dtypes every later call will have; they are copied into
            the graph's static inputs.
        warmup: eager steps before the capture (lets lazily created state, e.g. momentum buffers, exist first).

    Calling the step with new inputs copies them in, replays the graph and returns the loss (a tensor that the
    next call overwrites: clone it to keep it).
    """

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        optimizer: torch.optim.Optimizer,
        example_inputs: Sequence[torch.Tensor],
        *,
        warmup: int = 3,
    ) -> None:
        if not example_inputs or any(not isinstance(t, torch.Tensor) for t in example_inputs):
            raise TypeError("example_inputs must be a non-empty sequence of tensors")
        devices = {t.device for t in example_inputs}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise RuntimeError(
                f"a graphed training step needs CUDA tensors on one device, got inputs on {sorted(map(str, devices))}"
            )
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.static_inputs = [t.detach().clone() for t in example_inputs]
        self.graph = torch.cuda.CUDAGraph()

        warm_up(self._step, warmup)
        # Gradients must live in the graph's memory pool: they are created inside the capture, not before it.
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step(zero_grad=False)

    def _step(self, zero_grad: bool = True) -> torch.Tensor:
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(*self.static_inputs)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.static_inputs):
            raise TypeError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for static, new in zip(self.static_inputs, inputs):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(
                    f"a graphed step replays fixed shapes and dtypes: expected {tuple(static.shape)} {static.dtype}, "
                    f"got {tuple(new.shape)} {new.dtype}"
                )
            if new.data_ptr() != static.data_ptr():
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.static_loss
