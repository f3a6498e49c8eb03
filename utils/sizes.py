"""Network input sizes: one side (a square) or ``[H, W]``, read into ``(H, W)`` and checked against a stride."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

__all__ = ["image_hw", "size_text", "stride_error"]


def _side(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        return None
    return int(value)


def image_hw(size, *, name: str = "image_size") -> tuple[int, int]:
    """``size`` (a positive int for a square, or a 2-sequence ``[H, W]``: list, tuple, OmegaConf ListConfig) as
    ``(H, W)``; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(size, Sequence) and not isinstance(size, (str, bytes)):
        sides = [_side(v) for v in size]
        if len(sides) != 2 or None in sides:
            shown = list(size) if not isinstance(size, (list, tuple)) else size
            raise ValueError(f"{name} must be a positive integer or [H, W] (two positive integers), got {shown!r}")
        return sides[0], sides[1]
    side = _side(size)
    if side is None:
        raise ValueError(f"{name} must be a positive integer, got {size!r} (or [H, W], two positive integers)")
    return side, side


def size_text(size) -> str:
    """``size`` as written on a command line: ``512`` for a square given as one side, ``[384, 640]`` otherwise."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        return str(int(size))
    h, w = image_hw(size)
    return f"[{h}, {w}]"


def stride_error(size, stride: int, *, name: str = "image_size", why: str = "") -> str | None:
    """``None`` when both sides of ``size`` are multiples of ``stride``; else one line naming ``name``, the value and
    the nearest valid sizes (each side rounded down and up to a multiple of ``stride``). ``why`` follows the stride
    (e.g. ", the stride of the coarsest feature level (P7)")."""
    h, w = image_hw(size, name=name)
    if not (h % stride or w % stride):
        return None

    def around(side: int) -> tuple[int, int]:
        return max(side // stride, 1) * stride, (side // stride + (side % stride > 0)) * stride

    (h_lo, h_hi), (w_lo, w_hi) = around(h), around(w)
    if isinstance(size, numbers.Integral):
        near = dict.fromkeys([size_text(h_lo), size_text(h_hi)])
    else:
        near = dict.fromkeys([size_text((h_lo, w_lo)), size_text((h_hi, w_hi))])
    sides = "" if isinstance(size, numbers.Integral) else " on each side"
    return f"{name}={size_text(size)} is not a multiple of {stride}{sides}{why}; use {' or '.join(near)}"
