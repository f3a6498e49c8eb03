"""What the Triton kernels share: finding Triton, checking once per device that a kernel builds and gives the right
answer before it is chosen automatically, and :func:`use_kernel`, which decides whether a setting runs the kernel."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

__all__ = ["available", "checked", "lazy_kernel", "tracing", "triton_modules", "use_kernel"]


@functools.cache
def triton_modules():
    """``(triton, triton.language)``, or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def lazy_kernel(build: Callable) -> Callable[[], tuple | None]:
    """A function returning ``(triton, build(triton, triton.language))``, built on first call and kept, or None
    where Triton is not installed: kernel modules import without Triton and compile nothing until used."""

    @functools.cache
    def get():
        found = triton_modules()
        return None if found is None else (found[0], build(*found))

    return get


def tracing() -> bool:
    """Whether the running code is being traced, exported or compiled: kernels are not launched there (the
    exported or compiled graph gets PyTorch operations instead)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def available(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device``: a CUDA device with Triton installed (or any device under
    ``TRITON_INTERPRET=1``, Triton's interpreter, which the tests use without a GPU)."""
    if triton_modules() is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


_CHECKED: dict[tuple[str, torch.device], bool] = {}


def checked(name: str, device: torch.device, probe: Callable[[torch.device], bool], fallback: str) -> bool:
    """:func:`available`, and ``probe(device)`` (build and run kernel ``name`` on a small case, True when its answer
    is right) succeeded; probed once per kernel and device. Where Triton is installed but cannot build kernels
    (say, no C compiler), or the answer is wrong, a warning names ``fallback`` (what is used instead) and the
    answer is False."""
    device = torch.device(device)
    key = (name, device)
    if key not in _CHECKED:
        ok = available(device)
        if ok:
            try:
                ok = bool(probe(device))
                if not ok:
                    warnings.warn(f"the Triton {name} kernel gave a wrong answer on {device}: {fallback} is used "
                                  "instead", stacklevel=3)
            except Exception as err:  # noqa: BLE001 -- any build or launch failure means: use the fallback
                warnings.warn(f"the Triton {name} kernel cannot run on {device} ({type(err).__name__}: {err}); "
                              f"{fallback} is used instead", stacklevel=3)
                ok = False
        _CHECKED[key] = ok
    return _CHECKED[key]


def use_kernel(impl: str, device: torch.device, kernel, option: str, instead: str) -> bool:
    """Whether a setting ``option`` with value ``impl`` launches the kernel of module ``kernel`` (its ``available``
    and ``usable``) on ``device``: ``"triton"``, yes, and an error naming the other values ``instead`` where it
    cannot run there; ``"auto"``, on CUDA where its first run gave the right answer; any other value, no. Callers
    decide first what tracing and compilation get."""
    device = torch.device(device)
    if impl == "triton":
        if not kernel.available(device):
            raise RuntimeError(f"{option}='triton' needs a CUDA device and Triton installed, got {device}; use "
                               f"{option}={instead}")
        return True
    return impl == "auto" and device.type == "cuda" and kernel.usable(device)
