"""Convert ``effdet`` (Ross Wightman's efficientdet-pytorch) state dicts into this project's models.

``effdet`` is not imported here: the variants' settings are written out in :mod:`models.effdet_variants`
(checked against ``effdet.config.get_efficientdet_config`` by the tests), so converting needs only torch.

How the structures map (``N`` = number of backbone levels, 3 for P3-P5):

==========================================================  ==================================================
effdet                                                      effdense (:class:`models.DenseModel`)
==========================================================  ==================================================
``backbone.*``                                              ``backbone.body.*`` (same timm ``features_only``)
``fpn.resample.<N+i>.conv.{conv,bn}``                       ``neck.extra.<i>.0.{conv,norm}`` (P6 1x1 conv+BN)
``fpn.cell.<c>.fnode.<n>.combine.resample.<offset>.conv``   ``neck.cells.<c>.nodes.<n>.resample.<k>.project``
                                                            with ``k`` the position of ``offset`` in the node's
                                                            inputs (effdet keys by the input id, we by position)
``fpn.cell.<c>.fnode.<n>.combine.edge_weights``             ``neck.cells.<c>.nodes.<n>.weight``
``fpn.cell.<c>.fnode.<n>.after_combine.conv.{conv_dw,       ``neck.cells.<c>.nodes.<n>.conv.{depthwise,
conv_pw,bn}``                                               pointwise,norm}``
``{class,box}_net.conv_rep.<r>.{conv_dw,conv_pw}``          ``head.{class,box}_net.convs.<r>.{depthwise,pointwise}``
``{class,box}_net.bn_rep.<r>.<level>.bn``                   ``head.{class,box}_net.norms.<r>.<level>``
``{class,box}_net.predict.{conv_dw,conv_pw}``               ``head.{class,box}_net.predict.{depthwise,pointwise}``
==========================================================  ==================================================

Conv biases that effdet's TensorFlow ports keep in front of a BatchNorm (``redundant_bias``) are folded
exactly into that norm's running mean (``BN(x + b)`` with mean ``m`` is ``BN(x)`` with mean ``m - b``; in
training mode the batch mean absorbs the bias anyway); a head conv shared across levels folds its bias into
every level's norm. effdet's box net predicts ``(ty, tx, th, tw)`` per anchor on yx-ordered anchors, ours
``(dx, dy, dw, dh)`` on xyxy anchors (:class:`heads.BoxCoder` with unit weights): the box predict conv's output
channels are permuted ``[1, 0, 3, 2]`` within each anchor. Anchors need no permutation: both orders are
level, row, column, octave scale, aspect ratio, with the same sizes and centres.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from necks.bifpn import bifpn_topology
from utils.state_dicts import WeightsMismatchError, state_dict_mismatches

from .effdet_variants import (
    EFFDET_POSTPROCESS,
    EFFDET_VARIANTS,
    EffDetVariant,
    build_effdet_equivalent,
    config_overrides,
    get_variant,
)

__all__ = [
    "EFFDET_POSTPROCESS",
    "EFFDET_VARIANTS",
    "EffDetVariant",
    "build_effdet_equivalent",
    "config_overrides",
    "convert_effdet_state_dict",
    "get_variant",
    "infer_num_classes",
]

_BACKBONE_LEVELS = (3, 4, 5)  # effdet's out_indices (2, 3, 4) of an EfficientNet


def infer_num_classes(state: Mapping[str, torch.Tensor], variant: str | EffDetVariant) -> int:
    """Number of classes of an effdet state dict, from its class prediction bias."""
    v = get_variant(variant)
    bias = state.get("class_net.predict.conv_pw.bias")
    if bias is None:
        raise WeightsMismatchError("not an effdet state dict: 'class_net.predict.conv_pw.bias' is missing")
    n = bias.shape[0]
    if n % v.num_anchors:
        raise WeightsMismatchError(
            f"class_net.predict.conv_pw.bias has {n} outputs, not a multiple of {v.num_anchors} anchors"
        )
    return n // v.num_anchors


# --------------------------------------------------------------------------------------------- renaming
_SEP = {"conv_dw": "depthwise", "conv_pw": "pointwise"}


class _Renamer:
    """Maps one effdet key to ``(our_key, kind)``; ``kind`` is "copy", "fold" (a bias to fold into the norm
    prefix(es) returned instead of a key) or "box_predict" (permute output channels)."""

    def __init__(self, v: EffDetVariant) -> None:
        self.num_backbone = len(_BACKBONE_LEVELS)
        self.num_levels = v.max_level - v.min_level + 1
        self.nodes = bifpn_topology(v.min_level, v.max_level)

    def __call__(self, key: str) -> tuple[str | list[str], str] | None:
        if key.startswith("backbone."):
            return "backbone.body." + key.removeprefix("backbone."), "copy"

        m = re.fullmatch(r"fpn\.resample\.(\d+)\.conv\.(conv|bn)\.(\w+)", key)
        if m:
            idx = int(m[1]) - self.num_backbone
            if idx < 0:
                return None
            return self._conv_bn(f"neck.extra.{idx}.0", m[2], m[3])

        m = re.fullmatch(r"fpn\.cell\.(\d+)\.fnode\.(\d+)\.(.+)", key)
        if m:
            cell, n, rest = int(m[1]), int(m[2]), m[3]
            if n >= len(self.nodes):
                return None
            base = f"neck.cells.{cell}.nodes.{n}"
            if rest == "combine.edge_weights":
                return f"{base}.weight", "copy"
            r = re.fullmatch(r"combine\.resample\.(\d+)\.conv\.(conv|bn)\.(\w+)", rest)
            if r:
                offset = int(r[1])
                if offset not in self.nodes[n].inputs:
                    return None
                k = self.nodes[n].inputs.index(offset)
                return self._conv_bn(f"{base}.resample.{k}.project", r[2], r[3])
            r = re.fullmatch(r"after_combine\.conv\.(conv_dw|conv_pw|bn)\.(\w+)", rest)
            if r:
                if r[1] == "bn":
                    return f"{base}.conv.norm.{r[2]}", "copy"
                if r[1] == "conv_pw" and r[2] == "bias":
                    return [f"{base}.conv.norm"], "fold"
                if r[2] == "weight":
                    return f"{base}.conv.{_SEP[r[1]]}.weight", "copy"
            return None

        m = re.fullmatch(r"(class_net|box_net)\.(.+)", key)
        if m:
            net, rest = m[1], m[2]
            base = f"head.{net}"
            r = re.fullmatch(r"conv_rep\.(\d+)\.(conv_dw|conv_pw)\.(weight|bias)", rest)
            if r:
                if r[3] == "bias":
                    if r[2] != "conv_pw":
                        return None
                    return [f"{base}.norms.{r[1]}.{lv}" for lv in range(self.num_levels)], "fold"
                return f"{base}.convs.{r[1]}.{_SEP[r[2]]}.weight", "copy"
            r = re.fullmatch(r"bn_rep\.(\d+)\.(\d+)\.bn\.(\w+)", rest)
            if r:
                return f"{base}.norms.{r[1]}.{r[2]}.{r[3]}", "copy"
            r = re.fullmatch(r"predict\.(conv_dw|conv_pw)\.(weight|bias)", rest)
            if r:
                if r[1] == "conv_dw" and r[2] == "bias":
                    return None
                kind = "box_predict" if net == "box_net" and r[1] == "conv_pw" else "copy"
                return f"{base}.predict.{_SEP[r[1]]}.{r[2]}", kind
        return None

    @staticmethod
    def _conv_bn(prefix: str, part: str, name: str) -> tuple[str | list[str], str] | None:
        if part == "bn":
            return f"{prefix}.norm.{name}", "copy"
        if name == "bias":
            return [f"{prefix}.norm"], "fold"
        return f"{prefix}.conv.{name}", "copy"


def _box_channel_permutation(num_outputs: int) -> torch.Tensor:
    """Index ``p`` with ``ours[c] = effdet[p[c]]``: per anchor (dx, dy, dw, dh) <- (ty, tx, th, tw)."""
    if num_outputs % 4:
        raise WeightsMismatchError(f"box_net.predict has {num_outputs} outputs, not a multiple of 4")
    per_anchor = torch.tensor([1, 0, 3, 2])
    return (torch.arange(0, num_outputs, 4)[:, None] + per_anchor[None]).reshape(-1)


def convert_effdet_state_dict(
    state: Mapping[str, torch.Tensor], *, variant: str | EffDetVariant, num_classes: int | None = None
) -> dict[str, torch.Tensor]:
    """effdet state dict -> state dict of :func:`build_effdet_equivalent` ``(variant, num_classes)``.

    ``num_classes`` defaults to what the class prediction layer holds. A key that maps nowhere, a key the model
    needs but the file lacks, or a shape that does not fit raises :class:`WeightsMismatchError` naming them.
    The input is not modified; returned tensors are fresh copies.
    """
    v = get_variant(variant)
    state = {k.removeprefix("module."): v_ for k, v_ in state.items()}
    state = {k.removeprefix("model."): v_ for k, v_ in state.items()}
    if num_classes is None:
        num_classes = infer_num_classes(state, v)

    rename = _Renamer(v)
    out: dict[str, torch.Tensor] = {}
    folds: list[tuple[str, list[str], torch.Tensor]] = []
    unexpected: list[str] = []
    for key, value in state.items():
        mapped = rename(key)
        if mapped is None:
            unexpected.append(key)
            continue
        target, kind = mapped
        if kind == "fold":
            folds.append((key, target, value))
        elif kind == "box_predict":
            out[target] = value.detach().clone()[_box_channel_permutation(value.shape[0])]
        else:
            out[target] = value.detach().clone()

    with torch.device("meta"):
        model = build_effdet_equivalent(v, num_classes=num_classes)
    expected = model.state_dict()

    problems: list[str] = []
    if unexpected:
        problems.append(f"{len(unexpected)} effdet keys with no place in {v.name}, e.g. {unexpected[:5]}")
    bad_folds = []
    for key, norms, bias in folds:
        for norm in norms:
            mean = out.get(f"{norm}.running_mean")
            if mean is None or mean.shape != bias.shape:
                bad_folds.append(f"{key} -> {norm}")
                continue
            # BN(x + b) with running mean m equals BN(x) with running mean m - b.
            out[f"{norm}.running_mean"] = mean - bias.to(mean.dtype)
    if bad_folds:
        problems.append(f"{len(bad_folds)} conv biases without a matching norm, e.g. {bad_folds[:5]}")
    problems += state_dict_mismatches(expected, out, source_name="converted file")
    if problems:
        raise WeightsMismatchError(
            f"effdet weights do not match {v.name} ({num_classes} classes): " + "; ".join(problems)
        )
    return {k: out[k] for k in expected}
