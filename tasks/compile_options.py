"""The ``torch.compile`` keyword arguments of a task (``task.module.compile_options``), checked once when the task
is made, with inductor's own CUDA graphs kept out of a captured training step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import plain_dict

__all__ = ["COMPILE_OPTIONS", "compile_options"]

#: The keyword arguments of ``torch.compile`` that ``compile_options`` may set.
COMPILE_OPTIONS = frozenset({"backend", "mode", "dynamic", "fullgraph", "options"})


def compile_options(options: Mapping[str, Any] | None, *, compile: bool, cuda_graph: bool) -> dict[str, Any]:
    """The keyword arguments for ``torch.compile``: ``options`` checked (unknown keys, ``mode`` with ``options``, and
    with a captured training step, modes that take CUDA graphs themselves are errors), ``dynamic`` ``False`` unless
    set (training crops have one size)."""
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"compile_options must be a mapping, got {options!r}")
    options = plain_dict(options or {})
    unknown = sorted(set(options) - COMPILE_OPTIONS)
    if unknown:
        raise ValueError(
            f"compile_options: unknown key(s) {unknown}; torch.compile takes {sorted(COMPILE_OPTIONS)}"
        )
    if options.get("mode") is not None and options.get("options") is not None:
        raise ValueError("compile_options: set mode or options, not both (torch.compile takes one of them)")
    if cuda_graph and compile:
        if _compiles_cuda_graphs(options):
            raise ValueError(
                f"task.module.cuda_graph=true captures the whole training step as one CUDA graph, and "
                f"compile_options {options} make torch.compile take CUDA graphs of its own inside it: use the "
                "default mode or max-autotune-no-cudagraphs (or task.module.cuda_graph=false)")
        options = _without_inductor_cuda_graphs(options)
    return {"dynamic": False, **options}


def _compiles_cuda_graphs(options: Mapping[str, Any]) -> bool:
    """Whether ``torch.compile`` with these keyword arguments is asked to capture CUDA graphs itself (its
    ``reduce-overhead`` and ``max-autotune`` modes, the inductor option ``triton.cudagraphs``, the ``cudagraphs``
    backend)."""
    if options.get("mode") in ("reduce-overhead", "max-autotune") or options.get("backend") == "cudagraphs":
        return True
    return (options.get("options") or {}).get("triton.cudagraphs") is True


def _without_inductor_cuda_graphs(options: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for a network that a captured training step replays: inductor's own CUDA
    graphs off explicitly (``TORCHINDUCTOR_CUDAGRAPHS=1`` or its config would turn them on in any mode); a mode
    becomes its inductor options (torch.compile takes a mode or options, not both)."""
    if options.get("backend", "inductor") != "inductor":
        return options
    options = dict(options)
    mode = options.pop("mode", None)
    settings = dict(options.get("options") or {})
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        settings = {**list_mode_options(mode), **settings}
    options["options"] = {**settings, "triton.cudagraphs": False}
    return options
