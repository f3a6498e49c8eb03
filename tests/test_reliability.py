"""Scale-out and reliability: 2-process DDP on CPU (gloo) with metrics equal to single-process evaluation,
crash-safe checkpoint writes, last.ckpt at the final step, and non-finite losses skipped then stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.config import compose
from tasks.runner import evaluate, train

ROOT = Path(__file__).resolve().parent.parent

TINY_DET = [
    "data=synthetic", "model.image_size=128", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
    "data.batch_size=4", "data.num_workers=0", "data.synthetic.num_train=16", "data.synthetic.num_val=7",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
]
TINY_SEG = [
    "task=segmentation", "data=synthetic", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
    "data.batch_size=2", "data.num_workers=0", "data.synthetic.num_train=8", "data.synthetic.num_val=5",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
]


def _ddp_train(tmp_path: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(ROOT / "tools" / "train.py"), *overrides, "trainer.devices=2", "trainer.strategy=ddp",
        "trainer.max_steps=3", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
        # One image per evaluation batch: batch composition changes float rounding in the convolutions.
        "data.val_batch_size=1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_two_process_ddp_metrics_equal_single_process(tmp_path, task):
    """An odd number of val images over 2 ranks: every image is evaluated exactly once, and the metrics of the
    distributed run's final evaluation equal evaluating its last.ckpt in one process."""
    tiny = TINY_DET if task == "detection" else TINY_SEG
    proc = _ddp_train(tmp_path, tiny)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    run = tmp_path / "run"
    ddp_metrics = json.loads((run / "metrics.json").read_text())
    assert ddp_metrics.pop("data")["images"] == (7 if task == "detection" else 5)
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3  # the final step
    # One intra-op thread, as each of the two processes had: the thread count changes float rounding.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate(compose("eval", [*tiny, f"ckpt={last}", "data.val_batch_size=1"]), tmp_path / "eval",
                          overrides=[f"ckpt={last}", "data.val_batch_size=1"])
    finally:
        torch.set_num_threads(threads)
    if task == "detection":
        preds = json.loads((run / "predictions.json").read_text())
        assert len({p["image_id"] for p in preds}) == 7  # all images, none lost
        ddp_per_class, single_per_class = ddp_metrics.pop("per_class"), single.pop("per_class")
        assert ddp_metrics == pytest.approx(single, abs=1e-12)
        for name, values in single_per_class.items():
            assert ddp_per_class[name] == {k: v if v is None else pytest.approx(v, abs=1e-12) for k, v in values.items()}
    else:
        assert len(list((run / "predictions").glob("*.png"))) == 5
        assert ddp_metrics["mIoU"] == pytest.approx(single["mIoU"], abs=1e-12)
        assert ddp_metrics["IoU"] == single["IoU"] or all(
            (a is None and b is None) or a == pytest.approx(b, abs=1e-12)
            for a, b in zip(ddp_metrics["IoU"].values(), single["IoU"].values())
        )


def test_unpadded_sampler_covers_each_index_once():
    from tasks.samplers import UnpaddedDistributedSampler

    data = list(range(7))
    seen = []
    for rank in range(3):
        sampler = UnpaddedDistributedSampler(data, num_replicas=3, rank=rank)
        indices = list(sampler)
        assert len(indices) == len(sampler)
        seen += indices
    assert sorted(seen) == data


# ---------------------------------------------------------------------------------------------- checkpoints
def test_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from tasks.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 1 and torch.equal(kept["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_last_checkpoint_holds_the_final_step_mid_epoch(tmp_path):
    # 16 images / batch 4 = 4 steps per epoch; stopping at 6 is mid-epoch.
    train(compose("train", [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=6",
                            "eval_after_train=false"]), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert "current_model_state" in ckpt  # raw weights next to the EMA weights, for resuming


@pytest.mark.slow
def test_a_run_stopped_by_max_steps_mid_epoch_resumes_with_the_next_batch(tmp_path, monkeypatch):
    """Stopped by max_steps after 3 of an epoch's 4 batches, then resumed with a larger max_steps: the resumed run
    trains the epoch's 4th batch next and then whole epochs, up to the new max_steps (last.ckpt is written at the
    end of the last step, where its loop state still says "3 batches of epoch 0 done")."""
    import lightning as L

    from tasks import runner

    seen = []

    class Batches(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, trainer.current_epoch, batch_idx))

    original = runner._callbacks
    monkeypatch.setattr(runner, "_callbacks", lambda *args: [*original(*args), Batches()])
    base = [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "eval_after_train=false", "trainer.max_epochs=5"]
    train(compose("train", [*base, "trainer.max_steps=3"]), tmp_path / "run")
    assert seen == [(1, 0, 0), (2, 0, 1), (3, 0, 2)]
    seen.clear()
    train(compose("train", [*base, "trainer.max_steps=9", "ckpt_path=last"]), tmp_path / "run")
    assert seen == [(4, 0, 3), (5, 1, 0), (6, 1, 1), (7, 1, 2), (8, 1, 3), (9, 2, 0)]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 9 and "current_model_state" in ckpt


# ---------------------------------------------------------------------------------------------- non-finite loss
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, nan_losses, caplog):
    nan_losses({2, 3})
    cfg = compose("train", [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=4",
                            "eval_after_train=false", "trainer.log_every_n_steps=1"])
    with caplog.at_level("WARNING"):
        train(cfg, tmp_path / "run")
    assert "step skipped (1 skipped so far, 1 in a row)" in caplog.text
    assert "(2 skipped so far, 2 in a row)" in caplog.text
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_training_stops_when_the_loss_stays_nonfinite(tmp_path, nan_losses):
    from tasks.nonfinite import NonFiniteLossError

    nan_losses(set(range(1, 100)))
    cfg = compose("train", [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=10",
                            "eval_after_train=false", "task.module.max_nonfinite_steps=3"])
    with pytest.raises(NonFiniteLossError, match="NaN/inf for 3 steps in a row"):
        train(cfg, tmp_path / "run")


_DDP_NAN_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from heads.losses import DetectionLoss
original = DetectionLoss.__call__
calls = {{"n": 0}}
def patched(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    calls["n"] += 1
    if calls["n"] == 2:  # the second step of every process
        out = {{**out, "loss": out["loss"] * float("nan")}}
    return out
DetectionLoss.__call__ = patched
from tasks.config import compose
from tasks.runner import train
overrides = {overrides!r}
train(compose("train", overrides), {run!r})
print("finished", flush=True)
"""


@pytest.mark.slow
def test_nonfinite_step_is_skipped_on_every_ddp_process(tmp_path):
    overrides = [*TINY_DET, "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=4",
                 "eval_after_train=false", f"cache_dir={tmp_path / 'cache'}"]
    script = tmp_path / "ddp_nan.py"
    script.write_text(_DDP_NAN_SCRIPT.format(root=str(ROOT), overrides=overrides, run=str(tmp_path / "run")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    proc = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert output.count("finished") == 2
    assert output.count("step skipped (1 skipped so far, 1 in a row)") == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


class _Kill(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "kill_at", "every", "saved_at"), [(0, 3, 2, 3), (2, 4, 2, 4), (0, 5, None, 3),
                                                                       (2, 5, None, 3)])
def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, workers, kill_at, every, saved_at):
    """A 6-step run, and a run killed before step ``kill_at + 1`` then resumed with ckpt_path=last to 6 steps, end
    with the same weights, EMA weights and raw weights. 12 images / batch 4 = 3 steps per epoch. With last.ckpt
    every 2 steps: kill_at=3 resumes from the epoch's end at step 3 (written to last.ckpt too, not to a
    last-v1.ckpt beside it), kill_at=4 in the middle of an epoch from step 4. Without (and 7
    steps): from the checkpoint written at the end of the first epoch (step 3), where Lightning counts one epoch more
    than the trainer's, and the resumed run ends at max_steps in the middle of an epoch, before writing an epoch-end
    checkpoint of its own (its last.ckpt must still hold the raw weights, not the average). Stochastic depth is on, so the random state must be restored
    too; with 2 loader workers the augmentation must not depend on the worker."""
    import lightning as L

    from tasks import runner

    base = [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "data.synthetic.num_train=12", f"data.num_workers={workers}",
            "eval_after_train=false", "backbone.drop_path_rate=0.2", f"trainer.max_steps={6 if every else 7}",
            "trainer.max_epochs=-1", "seed=3", *([f"checkpoint.every_n_train_steps={every}"] if every else [])]
    train(compose("train", base), tmp_path / "full")

    class KillAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == kill_at:
                raise _Kill(f"killed before step {kill_at + 1}")

    original = runner._callbacks
    monkeypatch.setattr(runner, "_callbacks", lambda *args: [*original(*args), KillAt()])
    with pytest.raises(_Kill):
        train(compose("train", base), tmp_path / "part")
    monkeypatch.setattr(runner, "_callbacks", original)
    saved = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == saved_at
    train(compose("train", [*base, "ckpt_path=last"]), tmp_path / "part")

    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert full["global_step"] == resumed["global_step"] == (6 if every else 7)
    for key in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        for name, value in full[key].items():
            assert torch.allclose(value.float(), resumed[key][name].float(), atol=1e-5, rtol=0), (key, name)
    # And the runs did differ from a run with another seed (the comparison can fail).
    other = [*base, "seed=4"]
    train(compose("train", other), tmp_path / "other")
    different = torch.load(tmp_path / "other" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(not torch.allclose(v.float(), different["state_dict"][k].float(), atol=1e-5)
               for k, v in full["state_dict"].items())


def test_resumable_sampler_order_and_resume():
    from tasks.samplers import ResumableRandomSampler

    data = list(range(10))
    sampler = ResumableRandomSampler(data, seed=0, num_replicas=1, rank=0)
    sampler.set_epoch(1)
    keys = list(sampler)
    assert sorted(k % 10 for k in keys) == data and all(20 <= k < 30 for k in keys)  # (epoch + 1) * n + i
    again = ResumableRandomSampler(data, seed=0, num_replicas=1, rank=0)
    again.resume(1, 4)
    assert list(again) == keys[4:] and list(again) == keys  # the skip applies to the resumed epoch once
    assert list(ResumableRandomSampler(data, seed=1, num_replicas=1, rank=0)) != list(
        ResumableRandomSampler(data, seed=0, num_replicas=1, rank=0))
    shards = [list(ResumableRandomSampler(data, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(k % 10 for k in shards[0] + shards[1]) == data


def test_resume_from_last_continues_with_weights_only_loading(tmp_path):
    """ckpt_path=last in the same run dir continues to max_steps; the checkpoint loads with weights_only=True
    (no arbitrary pickled objects)."""
    base = [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "data.synthetic.num_train=12", "eval_after_train=false"]
    run = tmp_path / "run"
    train(compose("train", [*base, "trainer.max_steps=3"]), run)
    first = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    train(compose("train", [*base, "trainer.max_steps=6", "ckpt_path=last"]), run)
    second = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (first["global_step"], second["global_step"]) == (3, 6)
    assert second["callbacks"] and "current_model_state" in second and second["effdense_rng"]


def test_a_pending_nonfinite_check_is_not_copied():
    """A task copied (Predictor) or pickled after CUDA training must not carry the check's CUDA event."""
    import copy
    import pickle

    from tasks.nonfinite import _DeviceFlag

    flag = _DeviceFlag()
    flag.record(torch.tensor(0, dtype=torch.int32), torch.tensor(float("nan")))
    flag._event = lambda: None  # stands in for a CUDA event, which cannot be pickled
    for copied in (copy.deepcopy(flag), pickle.loads(pickle.dumps(flag))):
        assert copied.read() is None
    finite, payloads = flag.read()
    assert finite is False and torch.isnan(payloads[0])
    assert flag.read() is None  # read once


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_the_seed_sets_the_augmentation_too(tmp_path, task):
    """``data.seed`` fixes the training order and the augmentation per (seed, epoch, sample): the same sample key
    augments alike under one seed, differently under another."""
    from hydra.utils import instantiate

    def sample(seed: int) -> torch.Tensor:
        over = ["data=synthetic", f"cache_dir={tmp_path}", f"seed={seed}", "data.num_workers=0"]
        if task == "detection":
            over += ["model.image_size=64", "data.synthetic.num_train=4", "data.synthetic.num_val=2"]
        else:
            over += ["task=segmentation", "data.synthetic.num_train=2", "data.synthetic.num_val=1",
                     "data.crop_size=[64,64]"]
        dm = instantiate(compose("train", over).data)
        dm.prepare_data()
        dm.setup("fit")
        key = 3 * len(dm.train_dataset) + 1  # a sample key of epoch 2, as the resumable sampler yields
        return dm.train_dataset[key]["image"]

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


@pytest.mark.slow
def test_resuming_keeps_earlier_logs_and_refuses_a_bad_checkpoint(tmp_path):
    """A run resumed in its own directory keeps the first part's metrics.csv (moved to metrics.1.csv); a checkpoint
    that cannot be resumed from (truncated, or of another model) is one error naming the file, raised before
    anything in the run directory is written."""
    from tasks.checkpoint import CheckpointError

    base = [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "eval_after_train=false", "trainer.max_epochs=-1",
            "trainer.log_every_n_steps=1"]
    run = tmp_path / "run"
    train(compose("train", [*base, "trainer.max_steps=2"]), run)
    first = (run / "logs" / "metrics.csv").read_text()
    train(compose("train", [*base, "trainer.max_steps=3", "ckpt_path=last"]), run)
    assert (run / "logs" / "metrics.1.csv").read_text() == first
    assert (run / "logs" / "metrics.csv").read_text() != first

    config = (run / "config.yaml").read_text()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"{cut}: cannot be read as a checkpoint"):
        train(compose("train", [*base, "trainer.max_steps=4", f"ckpt_path={cut}", "seed=9"]), run)
    with pytest.raises(CheckpointError, match=f"{run / 'checkpoints' / 'last.ckpt'}: cannot resume this run from it, "
                                              "it holds another model"):
        train(compose("train", [*base, "trainer.max_steps=4", "ckpt_path=last", "neck.channels=24"]), run)
    assert (run / "config.yaml").read_text() == config  # not overwritten by the refused runs
