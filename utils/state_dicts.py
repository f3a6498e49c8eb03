"""Checking that a state dict fits a model before loading it: every key and shape, named when they do not."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["WeightsMismatchError", "state_dict_mismatches"]


class WeightsMismatchError(RuntimeError):
    """A weights file does not fit the model it is loaded into."""


def state_dict_mismatches(
    target: dict[str, torch.Tensor],
    source: dict[str, torch.Tensor],
    *,
    source_name: str = "file",
    show: int = 5,
    names: Mapping[str, str] | None = None,
) -> list[str]:
    """Describe how ``source`` fails to fit ``target`` (shape mismatches, missing keys, unexpected keys), in
    ``target``'s key order; an empty list means every key and shape matches. ``names``: how to call a key in the
    message (e.g. its name in the file, where the file was renamed), the key itself where absent."""
    names = names or {}
    missing = [names.get(k, k) for k in target if k not in source]
    unexpected = [names.get(k, k) for k in source if k not in target]
    shapes = [
        f"{names.get(k, k)}: {source_name} {tuple(source[k].shape)} vs model {tuple(v.shape)}"
        for k, v in target.items()
        if k in source and source[k].shape != v.shape
    ]
    problems = []
    for what, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            problems.append(f"{len(items)} {what}, e.g. {items[:show]}")
    return problems
