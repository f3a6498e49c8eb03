"""Backbones built from timm's ``features_only`` models, exposed through the feature contract."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from utils.state_dicts import WeightsMismatchError, state_dict_mismatches

from .contract import FeatureSpec, level_name
from .efficientnet_pytorch_layout import from_efficientnet_pytorch, is_efficientnet_pytorch_layout

__all__ = [
    "EFFICIENTNET_VARIANTS",
    "TimmBackbone",
    "WeightsMismatchError",
    "inplace_activations_for_inference",
    "load_backbone_weights",
    "out_of_place_activations",
]

log = logging.getLogger(__name__)

#: Short names accepted for EfficientNet B0-B7 and EfficientNet-Lite0-4. ``tf_`` variants use TensorFlow "same"
#: padding and are the ones the published EfficientDet checkpoints were trained with; ``liteN`` is timm's
#: ``tf_efficientnet_liteN`` (the backbone of EfficientDet-LiteN).
EFFICIENTNET_VARIANTS: dict[str, str] = {
    **{f"b{i}": f"efficientnet_b{i}" for i in range(8)},
    **{f"tf_b{i}": f"tf_efficientnet_b{i}" for i in range(8)},
    **{f"lite{i}": f"tf_efficientnet_lite{i}" for i in range(5)},
}


def _input_saving_activations() -> tuple[type[nn.Module], ...]:
    """Activation modules whose gradient is computed from their input (not their output)."""
    from timm.layers import activations as timm_acts

    types: list[type[nn.Module]] = [nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid]
    types += [getattr(timm_acts, n) for n in ("Swish", "Mish", "HardSwish", "HardSigmoid", "HardMish")
              if hasattr(timm_acts, n)]
    return tuple(types)


def out_of_place_activations(module: nn.Module) -> int:
    """Switch off ``inplace`` on the activations of ``module`` whose gradient needs their input (SiLU/Swish,
    Mish, hard-swish, hard-sigmoid); returns how many were changed. Values are unchanged.

    timm builds EfficientNet's SiLUs in place. While autograd records, an in-place SiLU makes autograd save a
    copy of its input first (the gradient is computed from it): one extra full-size copy per activation and step,
    the same memory as an out-of-place SiLU but one more kernel and one more pass over the map. Without autograd
    in-place is the faster one (no new buffer to write), so each changed module is marked and
    :func:`inplace_activations_for_inference` turns it back on in an inference copy.
    """
    types = _input_saving_activations()
    changed = 0
    for m in module.modules():
        if isinstance(m, types) and getattr(m, "inplace", False) is True:
            m.inplace = False
            m.inplace_without_autograd = True  # its builder made it in place: safe where nothing records
            changed += 1
    return changed


def inplace_activations_for_inference(module: nn.Module) -> int:
    """In a copy used without autograd: put back in place the activations :func:`out_of_place_activations`
    switched off (only those, which their builder made in place); returns how many."""
    changed = 0
    for m in module.modules():
        if getattr(m, "inplace_without_autograd", False) and getattr(m, "inplace", None) is False:
            m.inplace = True
            changed += 1
    return changed


class TimmBackbone(nn.Module):
    """Any timm model that supports ``features_only``, returning ``{"p<level>": Tensor}``.

    Args:
        name: timm model name (``efficientnet_b3``, ``tf_efficientnet_b3``, ``resnet50``, ...) or a short
            EfficientNet alias from :data:`EFFICIENTNET_VARIANTS` (``b3``, ``tf_b3``).
        levels: pyramid levels to return (level = log2(stride)); EfficientNets offer 1..5.
        pretrained: let timm load its ImageNet weights (needs a network connection or a local hub cache).
        weights: path to a local weights file (``.pth``/``.pt``/``.safetensors``) to load instead: timm's keys, or
            an EfficientNet's in the efficientnet_pytorch layout (see :func:`load_backbone_weights`); keys must match.
        drop_path_rate: stochastic depth rate passed to timm (``None`` keeps timm's default).
        frozen_stages: freeze the stem and the first N stages, where stage k is the part of the network up to
            timm's k-th feature (EfficientNet: stride 2, 4, 8, 16, 32 for k = 1..5). Frozen parameters get
            ``requires_grad=False`` and frozen BatchNorm layers stay in eval mode (fixed statistics).
        **timm_kwargs: passed to ``timm.create_model``.
    """

    def __init__(
        self,
        *,
        name: str,
        levels: Sequence[int] = (3, 4, 5),
        pretrained: bool = False,
        weights: str | Path | None = None,
        drop_path_rate: float | None = None,
        frozen_stages: int = 0,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        self.model_name = EFFICIENTNET_VARIANTS.get(name, name)
        levels = tuple(sorted(int(level) for level in levels))
        if not levels:
            raise ValueError("TimmBackbone needs at least one level")
        kwargs = dict(timm_kwargs)
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        # Build once to read which stride each feature index has, then keep only the requested ones.
        probe = timm.create_model(self.model_name, features_only=True, pretrained=False, **kwargs)
        reductions = probe.feature_info.reduction()
        stage_modules = [probe.feature_info.module_name(i) for i in range(len(reductions))]
        index_of = {int(r).bit_length() - 1: i for i, r in enumerate(reductions)}
        missing = [lv for lv in levels if lv not in index_of]
        if missing:
            offered = sorted(index_of)
            raise ValueError(f"{self.model_name} offers levels {offered} (strides {reductions}); asked for {missing}")
        out_indices = tuple(index_of[lv] for lv in levels)
        if out_indices == tuple(range(len(reductions))) and not pretrained:
            self.body = probe
        else:
            del probe
            self.body = timm.create_model(
                self.model_name, features_only=True, pretrained=pretrained, out_indices=out_indices, **kwargs
            )
        channels = self.body.feature_info.channels()
        strides = self.body.feature_info.reduction()
        self.out_specs: dict[str, FeatureSpec] = {
            level_name(lv): FeatureSpec(channels=int(c), stride=int(s)) for lv, c, s in zip(levels, channels, strides)
        }
        for lv, spec in zip(levels, self.out_specs.values()):
            if spec.stride != 2**lv:
                raise ValueError(f"{self.model_name}: feature {lv} has stride {spec.stride}, expected {2 ** lv}")
        self._names = list(self.out_specs)
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        #: The per-channel input mean and std (0..1 scale) the model's pretrained weights were trained with (timm's
        #: ``pretrained_cfg``; ImageNet's where timm names none).
        self.input_mean: tuple[float, ...] = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.input_std: tuple[float, ...] = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        out_of_place_activations(self.body)
        if weights is not None:
            load_backbone_weights(self, weights)
        if not 0 <= int(frozen_stages) <= len(stage_modules):
            raise ValueError(f"frozen_stages must be in 0..{len(stage_modules)} for {self.model_name}, got {frozen_stages}")
        self.frozen_stages = int(frozen_stages)
        self._frozen_modules: list[nn.Module] = []
        if self.frozen_stages:
            self._freeze(stage_modules[self.frozen_stages - 1])

    def _freeze(self, last: str) -> None:
        """Freeze every module registered before ``last`` (in forward order) and everything inside it."""
        names = [n for n, _ in self.body.named_modules() if n]
        # features_only wrappers may flatten "a.b" into "a_b".
        last_name = next((c for c in (last, last.replace(".", "_")) if c in names), None)
        if last_name is None:
            raise ValueError(f"{self.model_name}: cannot find stage module {last!r} to freeze")
        end = names.index(last_name)
        modules = dict(self.body.named_modules())
        for i, name in enumerate(names):
            if i <= end or name.startswith(last_name + "."):
                module = modules[name]
                own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
                if not own:
                    continue  # a container: its children decide (later stages may sit in the same container)
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
                self._frozen_modules.append(module)

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        for module in self._frozen_modules:
            module.eval()  # frozen BatchNorm keeps its running statistics
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        return dict(zip(self._names, feats))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "weights_only" in str(err):  # pickled Python objects (e.g. a whole model), which are not run
            raise WeightsMismatchError(
                f"{path}: holds pickled Python objects, not only tensors (a whole model?); save its state_dict()"
            ) from err
        raise WeightsMismatchError(f"{path}: cannot be read as a PyTorch weights file ({err})") from err
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"{path}: does not hold a state dict of tensors")
    return obj


def load_backbone_weights(backbone: TimmBackbone, path: str | Path) -> None:
    """Load a local weights file into ``backbone``; any key or shape mismatch is an error.

    The file is a timm state dict, or an EfficientNet state dict in the efficientnet_pytorch layout
    (``_conv_stem``, ``_blocks.<n>.*``; :mod:`backbones.efficientnet_pytorch_layout`), renamed to timm's keys by
    structure. It may hold the full classification model: keys of modules that a ``features_only`` model does not
    have (the classifier head) are skipped and logged. Every parameter and buffer of the backbone must be present
    with the right shape, otherwise :class:`WeightsMismatchError` names the offending keys (as the file names them)
    and nothing is loaded.
    """
    path = Path(path)
    state = _read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    target = backbone.body.state_dict()
    layout = ""
    names: dict[str, str] = {}
    problems: list[str] = []
    if is_efficientnet_pytorch_layout(state):
        layout = " (efficientnet_pytorch layout)"
        state, names, skipped, problems = from_efficientnet_pytorch(state, target)
    else:
        top_level = {k.split(".", 1)[0] for k in target}
        # Keys of modules a features-only model does not have (the classifier head) are skipped, not errors.
        skipped = [k for k in state if k.split(".", 1)[0] not in top_level]
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] in top_level}
    problems += state_dict_mismatches(target, state, names=names)
    if problems:
        raise WeightsMismatchError(
            f"{path}{layout} does not match backbone {backbone.model_name}: " + "; ".join(problems)
        )
    backbone.body.load_state_dict({k: state[k] for k in target}, strict=True)
    if skipped:
        log.info("%s: skipped %d keys outside the feature extractor (e.g. %s)", path, len(skipped), skipped[0])
    log.info("loaded backbone weights for %s from %s%s", backbone.model_name, path, layout)
