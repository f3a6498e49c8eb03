#!/usr/bin/env python
"""Evaluate a checkpoint on the val split: ``python tools/eval.py task=detection backbone=b3 ckpt=PATH``.

Prints the 12 COCO numbers and the per-class table (AP, AP50, ground-truth boxes), and writes ``metrics.json`` (with
``per_class``) and ``predictions.json`` (COCO results format, original image ids and category ids, xywh boxes in
original pixels) into the run directory.
"""

import hydra
from _common import CONFIG_PATH, check_command_line, user_errors
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    from tasks.runner import evaluate

    with user_errors():
        evaluate(cfg, HydraConfig.get().runtime.output_dir, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    check_command_line("eval")
    main()
