#!/usr/bin/env python
"""Predict on images: ``python tools/predict.py ckpt=PATH inputs=IMAGE_OR_FOLDER``.

Writes into the run directory (``hydra.run.dir=...``) ``predictions.json`` (one entry per image: ``file_name``,
and for detection ``boxes`` [x1, y1, x2, y2] in original pixels, ``scores``, ``labels``, ``names``; for
segmentation ``mask``, the class-index PNG under ``masks/``) and, unless ``visualize=false``, one annotated
picture per image under ``visualizations/``.
"""

import hydra
from _common import CONFIG_PATH, check_command_line, user_errors
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    from inference.predict_runner import predict

    with user_errors():
        predict(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    check_command_line("predict")
    main()
