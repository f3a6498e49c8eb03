#!/usr/bin/env python
"""Benchmark a model: ``python tools/benchmark.py task=detection backbone=b0 device=cuda compare=effdet``.

One JSON line per measurement (params, FLOPs, agreement with effdet, predict images/s, single-image latency,
training images/s, peak memory), then a table; the lines are also written to <run dir>/benchmark.jsonl.
See configs/benchmark.yaml for the options and docs/benchmarks.md for results.
"""

import json
import sys

import hydra
from _common import CONFIG_PATH, check_command_line, user_errors
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from benchmarks.harness import run_benchmark
    from benchmarks.options import BenchmarkError
    from benchmarks.report import environment, format_table, write_rows

    lines = [{"measure": "environment", **environment()}]  # what benchmark.jsonl holds: versions, then the rows
    print(json.dumps(lines[0]), flush=True)

    def emit(row: dict) -> None:
        lines.append(row)
        print(json.dumps(row), flush=True)

    try:
        with user_errors(BenchmarkError):
            rows = run_benchmark(cfg, emit=emit)
    finally:  # also the rows measured before a later measure failed
        write_rows(lines, Path(HydraConfig.get().runtime.output_dir) / "benchmark.jsonl")
    print("\n" + format_table(rows), file=sys.stderr, flush=True)


if __name__ == "__main__":
    check_command_line("benchmark")
    main()
