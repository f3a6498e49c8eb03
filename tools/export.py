#!/usr/bin/env python
"""Export a checkpoint: ``python tools/export.py ckpt=PATH [dynamic_batch=true] [postprocess=false]``.

Writes ``model.onnx`` (and ``model.pt``, TorchScript, where tracing works) into the run directory, checks each
against PyTorch (onnxruntime for ONNX) on the same input and writes the max differences to ``export.json``.
"""

import hydra
from _common import CONFIG_PATH, check_command_line, user_errors
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    from inference.export_runner import export

    with user_errors():
        export(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    check_command_line("export")
    main()
