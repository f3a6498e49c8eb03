"""A training step captured as one CUDA graph and replayed (:class:`CapturedStep`).

An EfficientDet training step launches thousands of small kernels; on a fast GPU the host cannot launch them as
quickly as the GPU runs them. Captured once, the step is replayed with a single launch. That needs static shapes
and no host synchronisation in the step; the target assignment (:class:`heads.TargetAssigner`) and loss are
written to have none (ground truth padded to a fixed number of boxes per image, labels -1 for padding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["CapturedStep", "warm_up"]


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


def _check_cuda_inputs(inputs: Sequence[torch.Tensor], what: str) -> None:
    if not inputs or any(not isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"{what} must be a non-empty sequence of tensors")
    devices = {t.device for t in inputs}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise RuntimeError(
            f"a captured step needs CUDA tensors on one device, got inputs on {sorted(map(str, devices))}"
        )


class CapturedStep:
    """``fn(*inputs) -> tensor`` run eagerly for its first ``warmup`` calls, then captured as one CUDA graph and
    replayed for every later call.

    The eager calls run on a side stream, as CUDA graph capture requires of the calls before it (lazily created
    state such as momentum buffers, cuDNN autotuning). Call ``warmup + 1`` captures ``fn`` with copies of its inputs
    as the graph's static inputs and replays it once, so every call, eager or replayed, does the work of ``fn`` once
    on its own inputs. Later calls copy their inputs into the static ones and replay.

    ``fn`` must not synchronise with the host, and a training step inside it must create its gradients itself
    (``optimizer.zero_grad(set_to_none=True)`` before its backward pass), so that they live in the graph's memory
    and each replay overwrites them. The returned tensor of a replay is the graph's static output: the next call
    overwrites it (clone it to keep it).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *, warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.fn = fn
        self.warmup = warmup
        #: Calls so far (eager and replayed).
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_output: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        """Whether the graph exists (the calls from now on replay it)."""
        return self.graph is not None

    @property
    def captures_next(self) -> bool:
        """Whether the next call captures the graph (the warm-up calls are done, no graph yet)."""
        return self.graph is None and self.calls >= self.warmup

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        _check_cuda_inputs(inputs, "inputs")
        if self.graph is None and not self.captures_next:
            out: list[torch.Tensor] = []
            warm_up(lambda: out.append(self.fn(*inputs)), 1, inputs[0].device)
            self.calls += 1
            return out[0]
        if self.graph is None:
            self.capture(*inputs)
        else:
            self._load(inputs)
        self.graph.replay()
        self.calls += 1
        return self.static_output

    def capture(self, *inputs: torch.Tensor) -> None:
        """Capture ``fn`` on copies of ``inputs`` (recorded, not run: replay to run it)."""
        _check_cuda_inputs(inputs, "inputs")
        self.static_inputs = [t.detach().clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        # "thread_local": CUDA calls of other threads (the data loader's pin-memory thread allocating and pinning the
        # next batches) may go on during the capture; the default ("global") would make them break it.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_output = self.fn(*self.static_inputs)
        self.graph = graph

    def matches(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether ``inputs`` have the captured graph's shapes and dtypes (true before the capture)."""
        if self.graph is None:
            return True
        return len(inputs) == len(self.static_inputs) and all(
            new.shape == static.shape and new.dtype == static.dtype for static, new in zip(self.static_inputs, inputs)
        )

    def run_eagerly(self, *inputs: torch.Tensor) -> torch.Tensor:
        """``fn(*inputs)`` without the graph (for inputs the graph cannot replay); the graph stays for later calls."""
        self.calls += 1
        return self.fn(*inputs)

    def _load(self, inputs: Sequence[torch.Tensor]) -> None:
        if len(inputs) != len(self.static_inputs):
            raise TypeError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for static, new in zip(self.static_inputs, inputs):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(
                    f"a captured step replays fixed shapes and dtypes: expected {tuple(static.shape)} {static.dtype}, "
                    f"got {tuple(new.shape)} {new.dtype}"
                )
            if new.data_ptr() != static.data_ptr():
                static.copy_(new, non_blocking=True)
