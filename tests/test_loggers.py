"""The run's loggers: TensorBoard event files with losses, learning rate, validation metrics (per class too) and the
validation pictures, read back with TensorBoard's own reader; CSV only writes no event file; bad names are one line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tasks.config import compose
from tasks.config_checks import ConfigError, check_loggers, check_run_config
from tasks.runner import train

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "data=synthetic",
    "backbone=timm",
    "backbone.name=test_efficientnet",
    "model.image_size=128",
    "neck.channels=16",
    "neck.num_repeats=1",
    "head.depth=1",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.synthetic.num_train=8",
    "data.synthetic.num_val=4",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "task.module.precise_bn.enabled=false",
]


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "logs" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_tensorboard_holds_losses_lr_metrics_per_class_and_pictures(tmp_path):
    """One epoch, then the run resumed for a second: the resumed run adds to the event files and keeps the first
    run's CSV."""
    run = tmp_path / "run"
    common = [*TINY, f"cache_dir={tmp_path / 'cache'}", "val_images.num=3"]
    train(compose("train", [*common, "trainer.max_epochs=1", "eval_after_train=false"]), run)
    result = train(compose("train", [*common, "ckpt_path=last"]), run)
    assert (run / "logs" / "metrics.csv").is_file() and (run / "logs" / "metrics.1.csv").is_file()
    assert len(list((run / "logs" / "tensorboard").glob("events.out.tfevents*"))) >= 2
    acc = _events(run)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/cls_loss", "lr-SGD/pg1", "val/AP", "val/AP50", "val/loss"} <= scalars
    per_class = result["metrics"]["per_class"]
    measured = [name for name, v in per_class.items() if v["AP"] is not None]
    assert measured and {f"val/AP_per_class/{name}" for name in measured} <= scalars
    assert not any(f"val/AP_per_class/{name}" in scalars for name, v in per_class.items() if v["AP"] is None)
    ap = acc.Scalars("val/AP")
    assert ap[-1].value == pytest.approx(result["metrics"]["AP"], abs=1e-6)  # the final evaluation's number
    assert all(np.isfinite(e.value) for e in acc.Scalars("train/loss"))
    # Three pictures per validation during training (two epochs), none from the sanity check or the final evaluation:
    # ground truth and prediction side by side at the 128-px network input (padding cropped off).
    assert sorted(acc.Tags()["images"]) == ["val_images/0", "val_images/1", "val_images/2"]
    for tag in acc.Tags()["images"]:
        pictures = acc.Images(tag)
        assert [p.step for p in pictures] == [2, 4]
        assert all(p.height <= 128 and p.width <= 2 * 128 + 4 and p.width > 128 for p in pictures)


@pytest.mark.slow
def test_csv_only_writes_no_event_file(tmp_path):
    run = tmp_path / "run"
    train(compose("train", [*TINY, f"cache_dir={tmp_path / 'cache'}", "logger=csv", "trainer.max_epochs=1",
                            "eval_after_train=false"]), run)
    assert not list(run.rglob("events.out.tfevents*")) and not (run / "logs" / "tensorboard").exists()
    with open(run / "logs" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "train/loss" in header and "val/AP" in header and "val/AP50_per_class/square" in header


def test_logger_setting_is_checked():
    assert check_loggers("csv") == ["csv"]
    assert check_loggers(compose("train", ["logger=[tensorboard,csv,tensorboard]"]).logger) == ["tensorboard", "csv"]
    assert list(compose("train", []).logger) == ["csv", "tensorboard"]  # the default
    for value, message in [("tensorbord", "logger: unknown logger 'tensorbord'; choose from csv, tensorboard, wandb"),
                           ([], "logger must be one of csv, tensorboard, wandb or a list of them")]:
        with pytest.raises(ConfigError, match=message):
            check_loggers(value)
    with pytest.raises(ConfigError, match=r"val_images.num must be an integer >= 0"):
        check_run_config(compose("train", ["data=synthetic", "val_images.num=-2"]))


def test_wandb_without_the_package_is_one_clear_error():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        assert check_loggers("wandb") == ["wandb"]
        return
    with pytest.raises(ConfigError, match=r"^logger=wandb needs the wandb package: pip install wandb"):
        check_loggers(["csv", "wandb"])


@pytest.mark.slow
def test_the_train_tool_reports_a_bad_logger_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), "data=synthetic", "logger=[csv,tensorbord]",
         f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env, check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    expected = ("error: logger: unknown logger 'tensorbord'; choose from csv, tensorboard, wandb (one name or a list, "
                "e.g. logger=[csv,tensorboard])")
    assert lines == [expected], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "config.yaml").exists()
