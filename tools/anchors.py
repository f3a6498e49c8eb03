#!/usr/bin/env python
"""Anchor fit: ``python tools/anchors.py data=... [backbone=bN] [model.image_size=...]``.

Prints, for the training boxes at the model's input size, the share that get a positive anchor under the current
``anchors.*`` settings (by COCO size bucket), and an ``anchors.anchor_scale`` / ``anchors.aspect_ratios`` override that
raises it; writes the same to ``anchors.json`` in the run directory.
"""

import hydra
from _common import CONFIG_PATH, check_command_line, user_errors
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="anchors")
def main(cfg: DictConfig) -> None:
    from tasks.anchor_report import anchor_report

    with user_errors(FileExistsError):
        anchor_report(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    check_command_line("anchors")
    main()
