#!/usr/bin/env python
"""Look at the data first: ``python tools/show_data.py data=... [task=segmentation] [split=val] [augment=true] [n=16]``.

Writes contact sheets (``sheet_000.png``, ...) of the split's samples as the loader delivers them, with their boxes and
class names or mask overlays, and ``data_stats.json`` (per-class object or pixel counts, box sizes) into the run
directory, and prints the counts.
"""

import hydra
from _common import CONFIG_PATH, check_command_line, user_errors
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="show_data")
def main(cfg: DictConfig) -> None:
    from tasks.show_data import show_data

    with user_errors(FileExistsError):
        show_data(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    check_command_line("show_data")
    main()
