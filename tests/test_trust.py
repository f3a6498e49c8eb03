"""Nothing silently wrong, nothing overwritten: the tools report on the data they were given, keep a run's files,
stop cleanly on Ctrl-C and SIGTERM, and refuse bad values in one line before anything runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from datasets.errors import DatasetNotFoundError
from tasks.checkpoint import CheckpointError, merge_checkpoint_config
from tasks.config import compose
from tasks.config_checks import ConfigError, check_export_config, check_predict_config, check_run_config
from tasks.runner import build_task, evaluate, train

ROOT = Path(__file__).resolve().parent.parent

TINY_DET = [
    "data=synthetic", "model.image_size=128", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
    "data.batch_size=4", "data.num_workers=0", "data.synthetic.num_train=12", "data.synthetic.num_val=7",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "task.module.precise_bn.num_batches=1",
]


#: Evaluation overrides that leave the dataset to the checkpoint.
EVAL = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "data.num_workers=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 2-step synthetic detection run (no final evaluation): its run directory and overrides."""
    tmp = tmp_path_factory.mktemp("trust")
    base = [*TINY_DET, f"cache_dir={tmp / 'cache'}", "trainer.max_steps=2", "eval_after_train=false"]
    train(compose("train", base), tmp / "run")
    return tmp, base


def _bytes(*paths: Path) -> list[bytes]:
    return [p.read_bytes() for p in paths]


# 1. evaluation on the folder named, never on data generated into it --------------------------------------------
def test_eval_with_data_root_reads_that_folder_and_never_generates_into_it(trained, tmp_path):
    tmp, _ = trained
    last = tmp / "run" / "checkpoints" / "last.ckpt"
    empty = tmp_path / "my_data"
    empty.mkdir()
    overrides = [f"ckpt={last}", f"data.root={empty}"]
    with pytest.raises(DatasetNotFoundError, match=str(empty)):
        evaluate(compose("eval", [*EVAL, *overrides]), tmp_path / "eval", overrides=overrides)
    assert list(empty.iterdir()) == []  # nothing generated into the user's folder
    assert not (tmp_path / "eval").exists()  # nor anything written for a failed evaluation

    # A real COCO-layout folder (the generated one, read as real data): evaluated, and said so.
    generated = next((tmp / "cache").glob("synthetic_coco/*"))
    overrides = [f"ckpt={last}", f"data.root={generated}"]
    metrics = evaluate(compose("eval", [*EVAL, *overrides]), tmp_path / "eval", overrides=overrides)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["data"] == {"format": "coco", "root": str(generated), "split": "val2017", "images": 7,
                               "synthetic": False}
    stored = evaluate(compose("eval", [*EVAL, f"ckpt={last}"]), tmp_path / "eval_stored", overrides=[f"ckpt={last}"])
    assert metrics == stored  # the same images as the checkpoint's own (generated) data
    assert json.loads((tmp_path / "eval_stored" / "metrics.json").read_text())["data"]["synthetic"] is True


# 2. a run directory with checkpoints is not reused silently ---------------------------------------------------
def test_a_new_run_in_a_directory_with_checkpoints_is_refused(trained):
    tmp, base = trained
    run = tmp / "run"
    kept = [run / "checkpoints" / "last.ckpt", run / "config.yaml"]
    before = _bytes(*kept)
    with pytest.raises(CheckpointError, match=r"already holds a run .*last\.ckpt.*ckpt_path=last.*hydra\.run\.dir"):
        train(compose("train", [*base, "trainer.max_steps=1"]), run)
    assert _bytes(*kept) == before


# 3. Ctrl-C and SIGTERM: a checkpoint at the step reached, the command that resumes, last.ckpt every epoch -------
class _Signal(L.Callback):
    def __init__(self, signum: int, at_step: int) -> None:
        self.signum, self.at_step = signum, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)  # delivered now, in the middle of the step's work


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, capsys,
                                                                               signum, code):
    """12 images / batch 4 = 3 steps per epoch, no validation in the run (every 100 epochs). A signal during step 5
    stops the run after that step with last.ckpt at step 5 and the resume command printed; resumed to 6 steps, the
    run ends with the weights of one never stopped."""
    from tasks import runner

    base = [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "eval_after_train=false", "trainer.max_steps=6",
            "trainer.max_epochs=-1", "trainer.check_val_every_n_epoch=100", "backbone.drop_path_rate=0.2"]
    train(compose("train", base), tmp_path / "full")
    original = runner._callbacks
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(runner, "_callbacks", lambda *args: [*original(*args), _Signal(signum, 4)])
    with pytest.raises(SystemExit) as stop:
        train(compose("train", base), tmp_path / "part", overrides=["data=synthetic", "trainer.max_steps=6"])
    assert stop.value.code == code
    monkeypatch.setattr(runner, "_callbacks", original)
    err = capsys.readouterr().err
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert f"stopped by {name} after step 5" in err
    assert (f"resume with: python tools/train.py data=synthetic trainer.max_steps=6 ckpt_path=last "
            f"hydra.run.dir={tmp_path / 'part'}") in err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back
    saved = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 5
    train(compose("train", [*base, "ckpt_path=last"]), tmp_path / "part")
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert full["global_step"] == resumed["global_step"] == 6
    for key in ("state_dict", "current_model_state"):
        for name, value in full[key].items():
            assert torch.allclose(value.float(), resumed[key][name].float(), atol=1e-5, rtol=0), (key, name)


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_last_checkpoint_at_every_epoch_end_whatever_the_validation_interval(tmp_path, monkeypatch):
    from tasks import runner

    class CrashAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                raise _Crash

    original = runner._callbacks
    monkeypatch.setattr(runner, "_callbacks", lambda *args: [*original(*args), CrashAt()])
    base = [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=9", "trainer.max_epochs=-1",
            "trainer.check_val_every_n_epoch=100"]
    with pytest.raises(_Crash):
        train(compose("train", base), tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3  # the end of the first epoch


# 4. config.yaml and earlier results change only once a run has started correctly ------------------------------
def test_a_failed_resume_or_evaluation_leaves_the_folder_as_it_was(trained, tmp_path):
    tmp, base = trained
    run = tmp / "run"
    before = _bytes(run / "config.yaml", run / "checkpoints" / "last.ckpt")
    # SGD refuses a negative momentum when the optimizer is made, inside the run.
    with pytest.raises(ValueError, match="momentum"):
        train(compose("train", [*base, "trainer.max_steps=4", "ckpt_path=last", "task.module.optimizer.momentum=-1"]), run)
    assert _bytes(run / "config.yaml", run / "checkpoints" / "last.ckpt") == before

    last = run / "checkpoints" / "last.ckpt"
    evaluate(compose("eval", [*EVAL, f"ckpt={last}"]), tmp_path / "ev", overrides=[f"ckpt={last}"])
    results = [tmp_path / "ev" / "config.yaml", tmp_path / "ev" / "metrics.json"]
    before = _bytes(*results)
    overrides = [f"ckpt={last}", f"data.root={tmp_path / 'nothing'}"]
    with pytest.raises(DatasetNotFoundError):
        evaluate(compose("eval", [*EVAL, *overrides]), tmp_path / "ev", overrides=overrides)
    assert _bytes(*results) == before


# 5. a checkpoint of the other task is refused before anything runs --------------------------------------------
def test_a_checkpoint_of_the_other_task_is_refused():
    seg = OmegaConf.to_container(compose("train", ["task=segmentation", "data=synthetic"]), resolve=True)
    det = compose("train", ["data=synthetic"])
    with pytest.raises(CheckpointError, match="holds a segmentation model, and this run trains detection: add "
                                              "task=segmentation"):
        merge_checkpoint_config(det, seg, ["init_from=seg.ckpt"], mode="finetune", source="seg.ckpt")
    with pytest.raises(CheckpointError, match="data= chose a detection dataset: add task=segmentation"):
        merge_checkpoint_config(compose("eval", ["data=coco", "ckpt=seg.ckpt"]), seg, ["ckpt=seg.ckpt", "data=coco"],
                                mode="eval", source="seg.ckpt")
    # Without a dataset choice the checkpoint's task and data are used: no error.
    merged = merge_checkpoint_config(compose("eval", ["ckpt=seg.ckpt"]), seg, ["ckpt=seg.ckpt"], mode="eval")
    assert merged.task.name == "segmentation"


# 6 and 7. values that cannot work: one line each, before anything runs -------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("model.image_size=100", r"model.image_size=100 is not a multiple of 8, the stride of the finest .* use 96 or 104"),
    ("model.image_size=300", "use 296 or 304"),
    ("model.image_size=0", "model.image_size must be a positive integer, got 0"),
    ("model.image_size=-1", "model.image_size must be a positive integer, got -1"),
    ("model.image_size=abc", "model.image_size must be a positive integer, got 'abc'"),
    ("data.batch_size=0", "data.batch_size must be a positive integer"),
    ("data.num_workers=-1", "data.num_workers must be an integer >= 0"),
    ("task.module.optimizer.lr=-1", "task.module.optimizer.lr must be a number > 0"),
    ("trainer.max_steps=-5", "trainer.max_steps must be an integer >= -1"),
    ("scale=d9", "unknown EfficientDet scale 'd9'"),
])
def test_bad_training_values_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        check_run_config(compose("train", ["data=synthetic", override]))


def test_good_values_pass():
    for overrides in ([], ["backbone=b3"], ["task=segmentation"], ["model.image_size=640"]):
        check_run_config(compose("train", ["data=synthetic", *overrides]))


@pytest.mark.parametrize(("override", "message"), [
    ("batch_size=0", "batch_size must be a positive integer"),
    ("score_threshold=abc", "score_threshold must be a number >= 0 and <= 1, got 'abc'"),
    ("score_threshold=1.5", "score_threshold must be a number >= 0 and <= 1"),
])
def test_bad_predict_values(override, message):
    with pytest.raises(ConfigError, match=message):
        check_predict_config(compose("predict", ["ckpt=a.ckpt", "inputs=x", override]))


@pytest.mark.parametrize("opset", [5, 99])
def test_bad_export_opsets(opset):
    with pytest.raises(ConfigError, match=f"opset must be between 13 and .*, got {opset}"):
        check_export_config(compose("export", ["ckpt=a.ckpt", f"opset={opset}"]))


def _tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env,
                          check=False)


@pytest.mark.parametrize(("args", "message"), [
    (["backbone=b9"], "error: In 'train': Could not find 'backbone/b9'; Available options in 'backbone': b0, b1,"),
    (["nonsense=1"], "error: Could not override 'nonsense'. To append to your config use +nonsense=1"),
    (["data=synthetic", "model.image_size=100"], "error: model.image_size=100 is not a multiple of 8"),
    (["data=synthetic", "task.module.precise_bn.num_batches=0"],
     "error: task.module.precise_bn.num_batches must be a positive integer, got 0"),
])
def test_the_train_tool_reports_config_errors_in_one_line(tmp_path, args, message):
    proc = _tool(str(ROOT / "tools" / "train.py"), *args, f"hydra.run.dir={tmp_path / 'run'}",
                 f"cache_dir={tmp_path / 'cache'}", "data.synthetic.num_train=4", "data.synthetic.num_val=2",
                 cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


# 8. normalisation from the backbone, stored in checkpoints -----------------------------------------------------
def test_normalisation_comes_from_the_backbone_and_is_stored():
    lite = compose("train", ["data=synthetic", "backbone=timm", "backbone.name=tf_efficientnet_lite0"])
    task = build_task(lite)
    assert task.normalization == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert torch.allclose(task.mean.flatten(), torch.full((3,), 127.5))
    assert task.run_config["task"]["module"]["mean"] == [0.5, 0.5, 0.5]
    b0 = build_task(compose("train", ["data=synthetic"]))
    assert b0.normalization["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # Set explicitly, it wins.
    own = build_task(compose("train", ["data=synthetic", "task.module.mean=[0.4,0.4,0.4]",
                                       "task.module.std=[0.2,0.2,0.2]"]))
    assert own.normalization == {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}
    # A checkpoint written before the normalisation was stored evaluates with ImageNet's, as it was trained.
    old = OmegaConf.to_container(lite, resolve=True)
    del old["task"]["module"]["mean"], old["task"]["module"]["std"]
    merged = merge_checkpoint_config(compose("eval", ["ckpt=old.ckpt"]), old, ["ckpt=old.ckpt"], mode="eval")
    assert list(merged.task.module.mean) == [0.485, 0.456, 0.406]


# 9. the smaller points ------------------------------------------------------------------------------------------
def test_a_box_dropped_from_training_is_not_a_ground_truth_in_the_evaluation(tmp_path, caplog):
    import cv2
    import numpy as np
    from test_coco_eval import _batch, _gt_dataset, _perfect

    from datasets import CocoDetection
    from evaluation.coco import CocoEvaluator

    data = _gt_dataset()
    data["annotations"].append({"id": 6, "image_id": 2, "category_id": 5, "bbox": [30.0, 40.0, 0.0, 20.0],
                                "area": 0.0, "iscrowd": 0})  # zero width: no training target
    (tmp_path / "images").mkdir()
    for im in data["images"]:
        cv2.imwrite(str(tmp_path / "images" / im["file_name"]), np.zeros((im["height"], im["width"], 3), np.uint8))
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = CocoDetection(image_dir=tmp_path / "images", ann_file=tmp_path / "ann.json", label_mode="category_id",
                       num_classes=90, transform=lambda image, boxes, labels: {"image": image})
    assert ds.num_degenerate == 1
    assert "not ground truths in the evaluation either" in caplog.text
    evaluator = CocoEvaluator(ds.coco)
    evaluator.update(**_batch(_perfect()))
    assert evaluator.compute()["AP"] == pytest.approx(1.0, abs=1e-12)


def test_an_evaluation_without_ground_truth_says_so(caplog):
    from test_coco_eval import _batch, _gt_dataset

    from evaluation.coco import CocoEvaluator, load_coco

    data = _gt_dataset()
    data["annotations"] = []
    with contextlib.redirect_stdout(io.StringIO()):
        from pycocotools.coco import COCO

        gt = COCO()
        gt.dataset = data
        gt.createIndex()
    evaluator = CocoEvaluator(load_coco(gt))
    evaluator.update(**_batch({1: [([0.0, 0.0, 10.0, 10.0], 0.9, 1)], 2: [], 3: []}))
    assert evaluator.compute()["AP"] == -1.0
    assert "have no annotations (no ground truth): every COCO metric is -1" in caplog.text


def test_a_corrupt_validation_image_is_named_before_training(tmp_path):
    from datasets.errors import DatasetError

    base = [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=1"]
    from hydra.utils import instantiate

    instantiate(compose("train", base).data).prepare_data()  # generates the data
    generated = next((tmp_path / "cache").glob("synthetic_coco/*"))
    bad = sorted((generated / "val2017").iterdir())[3]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" + bytes(200) + b"\xff\xd9")
    with pytest.raises(DatasetError, match=str(bad)):
        train(compose("train", [*base, f"data.root={generated}", "~data.synthetic"]), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_resuming_mid_epoch_gives_no_not_resumable_warning(tmp_path):
    """The data module resumes the training order itself, so Lightning's warning that the loader cannot (and that
    results are unreliable) would contradict the exact resume: it is not shown."""
    import warnings

    base = [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "eval_after_train=false", "trainer.max_epochs=-1",
            "task.module.precise_bn.enabled=false"]
    train(compose("train", [*base, "trainer.max_steps=2"]), tmp_path / "run")  # 3 steps per epoch: mid-epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose("train", [*base, "trainer.max_steps=4", "ckpt_path=last"]), tmp_path / "run")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "not resumable" in m], messages
    assert messages  # warnings were recorded (the check can fail)


def test_fine_tuning_an_older_checkpoint_keeps_the_normalisation_it_was_trained_with():
    lite = ["data=synthetic", "backbone=timm", "backbone.name=tf_efficientnet_lite0"]
    old = OmegaConf.to_container(compose("train", lite), resolve=True)
    del old["task"]["module"]["mean"], old["task"]["module"]["std"]  # as written before it was stored
    merged = merge_checkpoint_config(compose("train", lite), old, ["init_from=old.ckpt"], mode="finetune")
    assert list(merged.task.module.mean) == [0.485, 0.456, 0.406]
    new = OmegaConf.to_container(compose("train", lite), resolve=True)
    new["task"]["module"].update(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    merged = merge_checkpoint_config(compose("train", lite), new, ["init_from=new.ckpt"], mode="finetune")
    assert list(merged.task.module.mean) == [0.5, 0.5, 0.5]
    explicit = compose("train", [*lite, "task.module.mean=[0.4,0.4,0.4]", "task.module.std=[0.2,0.2,0.2]"])
    merged = merge_checkpoint_config(explicit, old, ["init_from=old.ckpt"], mode="finetune")
    assert list(merged.task.module.mean) == [0.4, 0.4, 0.4]


@pytest.mark.slow
def test_resuming_an_older_run_keeps_the_normalisation_it_was_trained_with(tmp_path):
    """A run started before the normalisation was stored (its checkpoint's config has none) trained a Lite backbone
    with ImageNet's mean and std; resumed, it goes on with them, not with the backbone's 0.5."""
    base = [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "eval_after_train=false", "trainer.max_epochs=-1",
            "backbone=timm", "backbone.name=tf_efficientnet_lite0", "task.module.precise_bn.enabled=false"]
    train(compose("train", [*base, "trainer.max_steps=1", "task.module.mean=[0.485,0.456,0.406]",
                            "task.module.std=[0.229,0.224,0.225]"]), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    del ckpt["effdense_config"]["task"]["module"]["mean"], ckpt["effdense_config"]["task"]["module"]["std"]
    torch.save(ckpt, last)
    train(compose("train", [*base, "trainer.max_steps=2", "ckpt_path=last"]), tmp_path / "run")
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 2
    assert resumed["effdense_config"]["task"]["module"]["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.slow
def test_no_validation_during_training_still_ends_with_the_final_evaluation(tmp_path):
    """trainer.limit_val_batches=0 (a listed Trainer option, no '+'): training validates nothing, and the final
    evaluation runs on the whole val split; last.ckpt holds the final step and its recomputed statistics."""
    run = tmp_path / "run"
    result = train(compose("train", [*TINY_DET, f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2",
                                     "trainer.limit_val_batches=0"]), run)
    written = json.loads((run / "metrics.json").read_text())
    assert written["data"]["images"] == 7 and written["AP"] == result["metrics"]["AP"]
    assert len({p["image_id"] for p in json.loads((run / "predictions.json").read_text())}) == 7
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["effdense_norm_statistics"]["step"] == 2


def test_the_common_trainer_options_are_set_without_a_plus():
    cfg = compose("train", ["trainer.limit_val_batches=0", "trainer.val_check_interval=0.5",
                            "trainer.accumulate_grad_batches=2", "trainer.max_time=00:01:00:00",
                            "trainer.limit_train_batches=10", "trainer.overfit_batches=2", "trainer.profiler=simple"])
    assert cfg.trainer.limit_val_batches == 0 and cfg.trainer.accumulate_grad_batches == 2
    assert cfg.trainer.profiler == "simple"


def test_the_configs_compose_with_hydras_own_api_and_no_set_up(tmp_path):
    """In a fresh interpreter, Hydra's compose API alone (as in a notebook): the project's resolvers (${effdet:...})
    are registered by its Hydra plugin module, so the config resolves."""
    script = (
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        f"with initialize_config_dir(config_dir={str(ROOT / 'configs')!r}, version_base='1.3'):\n"
        "    cfg = compose('train', ['data=synthetic', 'backbone=b3'])\n"
        "print(OmegaConf.to_container(cfg, resolve=True)['model']['image_size'])\n"
    )
    proc = _tool("-c", script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "896"
