#!/usr/bin/env python
"""Convert effdet (efficientdet-pytorch) weights into a self-describing effdense checkpoint.

    python tools/convert_weights.py --src tf_efficientdet_d3_47-0b525f35.pth --variant tf_efficientdet_d3 \\
        --dst d3.ckpt

The output holds ``state_dict`` (keys ``model.<name>``), ``effdense_config`` (the resolved training config
whose ``model`` instantiates exactly the converted model, with effdet's anchors and prediction settings) and
``effdense_source`` (variant and file). Errors print one line on stderr and exit with status 2; nothing is
written at ``--dst`` then.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # as tools/_common.py: run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# tasks.config (and with it Lightning, via the tasks package) is imported only once the weights have converted,
# so that bad input is reported in a few seconds.


class _UserError(Exception):
    pass


def _read_effdet_state(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise _UserError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _UserError(f"{path}: cannot be read as a PyTorch weights file ({err})") from err
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _UserError(f"{path}: does not hold a state dict of tensors")
    return obj


def _check_config_builds(cfg: dict, state: dict) -> None:
    """Instantiate ``cfg["model"]`` on the meta device and check it has exactly the converted keys and shapes."""
    import hydra
    import torch
    from omegaconf import OmegaConf

    from utils.state_dicts import state_dict_mismatches

    with torch.device("meta"):
        model = hydra.utils.instantiate(OmegaConf.create(cfg["model"]))
    problems = state_dict_mismatches(model.state_dict(), state, source_name="converted")
    if problems:  # a bug in the overrides, not in the user's input
        raise RuntimeError("the composed config does not build the converted model: " + "; ".join(problems))


def convert(src: Path, variant: str, dst: Path, num_classes: int) -> None:
    from omegaconf import OmegaConf

    from backbones.timm_backbone import WeightsMismatchError
    from models.effdet_convert import EFFDET_VARIANTS, config_overrides, convert_effdet_state_dict
    if variant not in EFFDET_VARIANTS:
        raise _UserError(f"unknown variant {variant!r}; choose one of {', '.join(sorted(EFFDET_VARIANTS))}")
    state = _read_effdet_state(src)
    try:
        converted = convert_effdet_state_dict(state, variant=variant, num_classes=num_classes)
    except WeightsMismatchError as err:
        raise _UserError(f"{src}: {err}") from None
    from tasks.config import compose  # registers the config resolvers

    cfg = OmegaConf.to_container(compose("train", config_overrides(variant, num_classes=num_classes)), resolve=True)
    _check_config_builds(cfg, converted)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in converted.items()},
        "effdense_config": cfg,
        "effdense_source": {"variant": variant, "file": str(src.resolve())},
    }
    if num_classes == 90:  # COCO's label space (label = category id - 1), as the published weights use
        from datasets.coco_names import coco_label_names

        ckpt["effdense_class_names"] = coco_label_names(90)
    _write_atomically(ckpt, dst)


def _write_atomically(obj: dict, dst: Path) -> None:
    """``torch.save`` to a temporary file next to ``dst``, then rename it over ``dst``."""
    import torch

    from utils.files import atomic_path

    try:
        with atomic_path(dst) as tmp:
            torch.save(obj, tmp)
    except OSError as err:
        raise _UserError(f"cannot write {dst}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, type=Path, help="effdet weights file (.pth)")
    parser.add_argument("--variant", required=True, help="effdet model name, e.g. tf_efficientdet_d3")
    parser.add_argument("--dst", required=True, type=Path, help="output checkpoint (.ckpt)")
    parser.add_argument("--num-classes", type=int, default=90, help="classes of the file's class head (default 90)")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.variant, args.dst, args.num_classes)
    except _UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {args.dst} ({args.variant}, {args.num_classes} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
