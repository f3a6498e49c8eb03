#!/usr/bin/env python
"""Train a model: ``python tools/train.py task=detection backbone=b3 [data=synthetic] [trainer.max_epochs=...]``.

Every run writes its resolved ``config.yaml``, ``checkpoints/`` (``last.ckpt`` and the best by the task's
monitored metric), ``logs/metrics.csv`` and, after training, ``metrics.json`` and ``predictions.json`` into
its run directory (``hydra.run.dir=...``). Resume with ``ckpt_path=<run dir>/checkpoints/last.ckpt``.
"""

import hydra
from _common import CONFIG_PATH, check_command_line, user_errors
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    from tasks.runner import train

    with user_errors():
        train(cfg, HydraConfig.get().runtime.output_dir, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    check_command_line("train")
    main()
