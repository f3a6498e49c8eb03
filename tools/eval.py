#!/usr/bin/env python
"""Evaluate a checkpoint on the val split: ``python tools/eval.py task=detection backbone=b3 ckpt=PATH``, or an
exported detection model through ONNX Runtime: ``python tools/eval.py onnx=model_int8.onnx [data=...]``.

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
    from inference.onnx_model import check_model_source

    with user_errors():
        if check_model_source(cfg) == "onnx":
            from inference.onnx_eval import evaluate_onnx

            evaluate_onnx(cfg, HydraConfig.get().runtime.output_dir, HydraConfig.get().overrides.task)
        else:
            from tasks.runner import evaluate

            evaluate(cfg, HydraConfig.get().runtime.output_dir, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    check_command_line("eval")
    main()
