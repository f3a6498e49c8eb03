"""One low-precision copy of a network's convolution weights per forward pass, instead of one cast per layer.

Under autocast every convolution casts its float32 weight (and bias) to bfloat16/float16 when it runs, and
autograd casts each weight's gradient back: two small kernels per layer and step (about 480 of the 2,337
operations of an EfficientDet-D0 training step on a GPU). :func:`low_precision_weights` makes the same copies at
once: the weights, viewed flat in their memory order, are concatenated and cast in one pass, and each layer gets
its own view of the result, with the weight's shape and strides. Each view starts on a 128-byte boundary (zeros
pad the pieces between): cuDNN reads a weight's address alignment when it picks a convolution kernel, and an
unaligned weight gets slower generic kernels. Autocast leaves tensors that already have its dtype alone, and the
gradients flow back through one cast and one split to the float32 parameters.

The values are those of autocast's own casts (the same rounding), and so are the gradients, bit for bit, whether
autocast runs with its weight-cast cache (PyTorch's default) or without it (Lightning's choice). The two differ only
for a layer used several times per forward pass: with the cache it gets one copy, so its gradients are summed in
the low precision before the cast back; without it each use casts anew and the sum is float32. So, without the
cache, the layers of modules that declare ``reuses_layers = True`` (EfficientDet's head, run once per level) and
parameters tied between layers keep autocast's per-use casts. A layer called several times without that
declaration gets one copy, as with the cache. One difference remains: a layer that takes part in no output gets a
zero gradient instead of none (the split's backward fills the unused pieces with zeros).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["low_precision_weights"]

def _stock_forwards() -> set:
    forwards = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}
    try:  # timm's "same"-padding convolution reads its weight as the stock one does
        from timm.layers import Conv2dSame

        forwards.add(Conv2dSame.forward)
    except ImportError:
        pass
    return forwards


_STOCK_FORWARDS = _stock_forwards()
#: ids of the modules inside a :func:`low_precision_weights` block (a nested block leaves them alone)
_ACTIVE: set[int] = set()


def _castable(module: nn.Module, *, per_use: bool) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """The (layer, name, parameter) triples to copy: weight and bias of layers whose forward is a stock
    convolution's or linear layer's (a layer that transforms its weight first, e.g. weight standardisation,
    keeps autocast's per-layer cast), without hooks or parametrizations, float32 parameters that require gradients
    (autocast casts only those; a float64 or float16 layer is left to it),
    in a contiguous or 4-d channels-last layout; with ``per_use``, not inside a module whose class declares
    ``reuses_layers`` and not tied between layers. Found anew at every call: parameters may change between steps."""
    found = []
    for layer in _layers(module, skip_reusing=per_use):
        if type(layer).forward not in _STOCK_FORWARDS or layer._forward_pre_hooks or layer._forward_hooks:
            continue
        for name in ("weight", "bias"):
            p = layer._parameters.get(name)
            if (isinstance(p, nn.Parameter) and p.dtype == torch.float32 and p.requires_grad
                    and (p.stride() == _contiguous_strides(p.shape)
                         or (p.dim() == 4 and p.stride() == _channels_last_strides(p.shape)))):
                found.append((layer, name, p))
    if per_use:  # a parameter tied between layers is used once per layer: each use casts, as autocast does
        layers_of: dict[int, int] = {}
        for _, _, p in found:
            layers_of[id(p)] = layers_of.get(id(p), 0) + 1
        found = [entry for entry in found if layers_of[id(entry[2])] == 1]
    return found


def _layers(module: nn.Module, *, skip_reusing: bool) -> list[nn.Module]:
    """``module.modules()`` (each once), in one walk; with ``skip_reusing``, without the subtrees of modules whose
    class declares ``reuses_layers`` (read from the class: a missing attribute on a module instance is slow)."""
    seen: set[int] = set()
    found: list[nn.Module] = []
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen or (skip_reusing and getattr(type(m), "reuses_layers", False)):
            continue
        seen.add(id(m))
        found.append(m)
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return found


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    _, c, h, w = shape
    return c * h * w, 1, w * c, c


#: each piece of the low-precision buffer starts at a multiple of this many elements (128 bytes in bf16/fp16)
ALIGN_ELEMENTS = 64
_PADS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _pad(n: int, like: torch.Tensor) -> torch.Tensor:
    """``n`` zeros (``n < ALIGN_ELEMENTS``) of ``like``'s dtype and device: a view of one kept tensor, so padding
    allocates nothing per step."""
    key = (like.device, like.dtype)
    zeros = _PADS.get(key)
    if zeros is None:
        zeros = _PADS[key] = torch.zeros(ALIGN_ELEMENTS, dtype=like.dtype, device=like.device)
    return zeros[:n]


def _flat(p: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``p`` (contiguous or 4-d channels-last) as a 1-d view in memory order, and whether it was viewed through the
    channels-last permutation. The copy a layer gets has exactly the parameter's strides (size-1 dimensions
    included: they can decide which kernel a convolution's backward pass uses)."""
    if p.stride() == _contiguous_strides(p.shape):
        return p.view(-1), False
    return p.permute(0, 2, 3, 1).reshape(-1), True  # contiguous in this order: a view


@contextlib.contextmanager
def low_precision_weights(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """While the block runs, ``module``'s convolution and linear weights and biases are ``dtype`` copies made in one
    cast (differentiable: gradients reach the float32 parameters); afterwards the parameters are back.

    Layers whose parameters do not require gradients, norms, and layers that transform their weight in their
    forward keep autocast's own casts; so do layers run several times per forward pass (in modules that declare
    ``reuses_layers``) when autocast's cast cache is off, as under Lightning: values and gradients are then those
    of autocast as it runs, bit for bit. Inside the block ``state_dict()`` would show the copies: nothing should
    read it there. A nested block on the same module changes nothing.
    """
    per_use = not torch.is_autocast_cache_enabled()
    entries = [] if id(module) in _ACTIVE else _castable(module, per_use=per_use)
    if not entries:
        yield
        return
    unique = list({id(p): p for _, _, p in entries}.values())  # a parameter tied between layers is copied once
    flats, channels_last = zip(*(_flat(p) for p in unique))
    parts, real = [], []  # real: the index in ``parts`` of each weight (the others are padding)
    for f in flats:
        real.append(len(parts))
        parts.append(f)
        if f.numel() % ALIGN_ELEMENTS:
            parts.append(_pad(ALIGN_ELEMENTS - f.numel() % ALIGN_ELEMENTS, f))
    low = torch.cat(parts).to(dtype)
    split = low.split([t.numel() for t in parts])
    pieces = [split[i] for i in real]
    copies = {}
    for p, piece, cl in zip(unique, pieces, channels_last):
        if cl:
            n, c, h, w = p.shape
            copies[id(p)] = piece.view(n, h, w, c).permute(0, 3, 1, 2)
        else:
            copies[id(p)] = piece.view(p.shape)
    _ACTIVE.add(id(module))
    try:
        for layer, name, p in entries:
            layer._parameters[name] = copies[id(p)]  # read by the layer's forward as ``self.<name>``
        yield
    finally:
        for layer, name, p in entries:
            layer._parameters[name] = p
        _ACTIVE.discard(id(module))
