"""tools/benchmark.py: side-by-side measurements against effdet, at a small size on the CPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["device=cpu", "image_size=128", "batch_size=2", "train_batch_size=2", "warmup=1", "iters=1", "rounds=2"]


def _tool(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), *overrides, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )


@pytest.mark.slow
def test_compare_effdet_on_cpu_prints_json_lines_table_and_ratios(tmp_path):
    res = _tool(tmp_path, "task=detection", "backbone=b0", "compare=effdet", *SMALL)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    env, rows = lines[0], lines[1:]
    assert env["measure"] == "environment" and env["effdet"] == "0.4.1" and env["torch"]
    assert lines == [json.loads(line) for line in (tmp_path / "benchmark.jsonl").read_text().splitlines()]
    by = {(r["measure"], r["impl"]): r for r in rows}
    measures = ("params", "flops", "ops", "predict", "latency", "train")
    assert set(by) == {(m, i) for m in measures for i in ("effdense", "effdet")} | {("agreement", "effdense")}
    # The same network: equal parameter counts and FLOPs (3.88M parameters, 0.31 GFLOPs at 128 px).
    assert by["params", "effdense"]["value"] == by["params", "effdet"]["value"] == 3_877_763
    assert by["flops", "effdense"]["value"] == by["flops", "effdet"]["value"] > 0.3
    agree = by["agreement", "effdense"]
    assert agree["model"] == "efficientdet_d0"
    assert agree["max_class_logit_diff"] < 1e-4
    assert agree["max_sorted_score_diff"] < 1e-5
    assert agree["detections_matched"] > 0.9 and agree["detections"] == 200  # near-ties may swap at the cut
    assert all(r["calibrated_bn"] for r in rows)  # random weights: both models share calibrated statistics
    for measure, unit, batch in (("predict", "images/s", 2), ("latency", "ms", 1), ("train", "images/s", 2)):
        ours, theirs = by[measure, "effdense"], by[measure, "effdet"]
        assert ours["unit"] == theirs["unit"] == unit and ours["batch"] == theirs["batch"] == batch
        assert ours["value"] > 0 and theirs["value"] > 0
        # ratio = this project's time / effdet's time, from the same run.
        assert ours["ratio"] == pytest.approx(ours["ms_per_call"] / theirs["ms_per_call"], rel=1e-2)
        assert "ratio" not in theirs
        assert ours["precision"] == "fp32" and ours["channels_last"] and ours["fold_bn"] and not ours["compile"]
        assert not theirs["fold_bn"] and not theirs["compile"]  # effdet's model as it comes
    # Operations per training step (forward + backward + SGD): fewer than effdet's, and none that waits for the
    # device (what lets the whole step be captured as one CUDA graph); effdet's labeller indexes with masks.
    ours, theirs = by["ops", "effdense"], by["ops", "effdet"]
    assert ours["unit"] == "operations per training step" and ours["batch"] == 2
    assert 0 < ours["value"] < theirs["value"] and ours["ratio"] == pytest.approx(ours["value"] / theirs["value"], abs=1e-3)
    assert ours["train_host_syncs"] == 0 < theirs["train_host_syncs"]
    assert 0 < ours["train_views"] < theirs["train_views"]  # views launch nothing but cost host time
    assert ours["predict_operations"] > 0 and theirs["predict_operations"] > 0
    table = res.stderr[re.search(r"^measure\s+impl", res.stderr, re.MULTILINE).start():]
    assert re.search(r"^agreement\s+effdense vs efficientdet_d0", table, re.MULTILINE)
    assert re.search(r"^latency\s+effdense\s+1\s+[\d.,]+\s+ms\s+[\d.]+", table, re.MULTILINE)
    assert re.search(r"^ops\s+effdense\s+2\s+train [\d,]+ \(0 syncs, [\d,]+ views\), predict", table, re.MULTILINE)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=segmentation", "compare=effdet"], "compare=effdet is for task=detection"),
        (["backbone=b4", "compare=effdet"], "effdet has no efficientdet_d4"),
        (["measures=[speed]"], "unknown measures ['speed']"),
        (["image_size=100", "device=cpu"], "image_size must be a multiple of 8 (the finest stride), got 100x100"),
        (["task=segmentation", "device=cpu", "measures=[train]", "train_image_size=[100,200]"],
         "train_image_size must be a multiple of 128 (the coarsest stride), got 100x200"),
        (["compare=effdet", "device=cpu", "measures=[train]", "image_size=256", "train_image_size=128"],
         "train_image_size 128x128 cannot be compared"),
        (["image_size=128", "device=cpu", "compare=effdet", "measures=[latency]", "effdet_compile=sometimes"],
         "effdet_compile must be null, true or false, got 'sometimes'"),
        (["image_size=128", "device=cpu", "measures=[train]", "train_boxes=0"],
         "train_boxes must be an integer >= 1, got 0"),
        (["image_size=128", "device=cpu", "measures=[params]", "effdet_checkpoint=/no/such.pth"],
         "effdet_checkpoint=/no/such.pth is loaded through effdet's model: it needs compare=effdet"),
        (["image_size=128", "device=cpu", "measures=[params]", "compare=effdet", "effdet_checkpoint=/no/such.pth"],
         "effdet_checkpoint=/no/such.pth: cannot be read as a state dict"),
        (["image_size=128", "device=cpu", "measures=[latency]", "iters=0"], "iters must be an integer >= 1, got 0"),
        (["image_size=128", "device=cpu", "measures=[latency]", "rounds=0"], "rounds must be an integer >= 1, got 0"),
        (["image_size=128", "device=cpu", "measures=[train]", "train_batch_size=1"],
         "train_batch_size=1 at 128x128: the coarsest feature map (stride 128) is 1x1"),
        (["image_size=128", "device=cpu", "measures=[params]", "task.module.cuda_graph=true", "measures=[params,fit]"],
         "task.module.cuda_graph=true (the captured training step) needs device=cuda"),
    ],
)
def test_bad_requests_exit_2_with_one_line(tmp_path, overrides, message):
    res = _tool(tmp_path, *overrides)
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_an_effdet_checkpoint_of_another_model_is_named(tmp_path):
    """A D1 state dict given to the default D0 comparison: one line naming the option, the model and the class count."""
    import effdet

    path = tmp_path / "d1.pth"
    torch.save(effdet.create_model("efficientdet_d1", pretrained=False, pretrained_backbone=False).state_dict(), path)
    res = _tool(tmp_path, "image_size=128", "device=cpu", "measures=[params]", "compare=effdet",
                f"effdet_checkpoint={path}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"effdet_checkpoint={path} is not a state dict of effdet's efficientdet_d0 with 90 classes" in res.stderr
    assert "size mismatch" in res.stderr


def test_rows_measured_before_a_failure_are_written(tmp_path):
    """A measure that fails (here: no data for the loader measure) after others ran: exit 2, and benchmark.jsonl holds
    the environment and the rows measured before it."""
    res = _tool(tmp_path, "image_size=128", "device=cpu", "measures=[params,data]", f"data.root={tmp_path / 'none'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [json.loads(line) for line in (tmp_path / "benchmark.jsonl").read_text().splitlines()]
    assert [r["measure"] for r in lines] == ["environment", "params"]


def test_the_data_measure_times_after_the_prefetched_batches(monkeypatch):
    """Each worker prepares prefetch_factor batches before the first is taken: those are not timed (with 8 workers,
    timing from the first batch counted up to 15 ready batches as instant ones)."""
    from omegaconf import OmegaConf

    import benchmarks.data_measure as bench

    taken, clock_reads = [0], []
    real_perf_counter = bench.time.perf_counter

    class Loader:
        prefetch_factor = 2

        def __len__(self):
            return 40

        def __iter__(self):
            taken[0] = 0
            while True:
                taken[0] += 1
                yield {"images": torch.zeros(2, 3, 4, 4)}

    class DataModule:
        def __init__(self, **kw):
            pass

        def prepare_data(self):
            pass

        def setup(self, stage):
            pass

        def train_dataloader(self):
            return Loader()

    def perf_counter():
        clock_reads.append(taken[0])  # batches taken when the clock is read
        return real_perf_counter()

    monkeypatch.setattr(bench.time, "perf_counter", perf_counter)
    monkeypatch.setattr("hydra.utils.instantiate", lambda cfg: DataModule(**cfg))
    cfg = OmegaConf.create({"data_workers": [0, 3], "data_batches": 5, "task": {"name": "detection"},
                            "data": {"num_workers": 0, "batch_size": 2, "root": "x", "image_size": 8}})
    rows = bench.data_rows(cfg, lambda row: None)
    assert [r["workers"] for r in rows] == [0, 3]
    # Start and end of each timed span: in the main process after the first batch; with 3 workers after 3 x 2.
    assert clock_reads == [1, 6, 6, 11]


def test_effdet_compile_sets_effdets_compilation_alone():
    from omegaconf import OmegaConf

    from benchmarks.options import effdet_paths
    from inference.fast_paths import FastPaths

    ours = FastPaths(compile=True, cudagraphs=True)
    assert effdet_paths(OmegaConf.create({"effdet_compile": None}), ours) is ours
    theirs = effdet_paths(OmegaConf.create({"effdet_compile": False}), ours)
    assert theirs == FastPaths(compile=False, cudagraphs=True)  # everything else as this project's
    assert effdet_paths(OmegaConf.create({}), ours) is ours  # configs without the key


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    res = _tool(tmp_path, "device=cuda")
    assert res.returncode == 2 and "CUDA is not available here; use device=cpu" in res.stderr


def test_segmentation_and_data_measures(tmp_path, synthetic_coco):
    from benchmarks.harness import run_benchmark
    from benchmarks.report import format_table
    from tasks.config import compose

    cfg = compose("benchmark", ["task=segmentation", "backbone=b0", "measures=[params,ops,predict,train]",
                                "image_size=[256,256]", "train_image_size=[128,256]", "batch_size=1",
                                "train_batch_size=2", "warmup=1", "iters=1", "rounds=1", "device=cpu"])
    rows = run_benchmark(cfg)
    assert [(r["measure"], r["impl"]) for r in rows] == [("params", "effdense"), ("ops", "effdense"),
                                                        ("predict", "effdense"), ("train", "effdense")]
    ops, predict, train = rows[1:]
    # The training step (forward, cross-entropy on label-sized logits, backward, SGD) at the training size, and the
    # predict call at the predict size; neither waits for the device (both can be captured as CUDA graphs).
    assert ops["unit"] == "operations per training step" and ops["value"] > ops["predict_operations"] > 0
    assert ops["train_host_syncs"] == ops["predict_host_syncs"] == 0
    assert (ops["batch"], ops["image_size"], ops["predict_batch"], ops["predict_image_size"]) == (
        2, [128, 256], 1, [256, 256])
    assert predict["image_size"] == [256, 256] and predict["value"] > 0 and "ratio" not in predict
    assert (train["unit"], train["batch"], train["image_size"]) == ("images/s", 2, [128, 256])
    assert train["value"] == pytest.approx(2 / (train["ms_per_call"] / 1000), rel=1e-2) and "focal_loss" not in train
    table = format_table(rows)
    assert re.search(r"^ops\s+effdense\s+2\s+train [\d,]+ \(0 syncs, [\d,]+ views\), predict", table, re.MULTILINE)
    assert re.search(r"^train\s+effdense\s+2\s+[\d.,]+\s+images/s\s+[\d,]+\s+128x256$", table, re.MULTILINE)
    assert re.search(r"^predict\s+effdense\s+1\s+.*256x256$", table, re.MULTILINE)
    assert re.search(r"operations\s+train 128x256, predict 256x256$", table, re.MULTILINE)

    cfg = compose("benchmark", ["data=synthetic", f"data.root={synthetic_coco}", "~data.synthetic", "measures=[data]",
                                "data_workers=[0,1]", "data.batch_size=4", "data_batches=2", "image_size=128",
                                "model.image_size=128"])
    rows = run_benchmark(cfg)
    assert [r["workers"] for r in rows] == [0, 1]
    for r in rows:
        assert r["measure"] == "data" and r["unit"] == "images/s" and r["value"] > 0 and r["batch"] == 4
        assert r["per_worker"] == pytest.approx(r["value"] / max(r["workers"], 1), rel=1e-2)
    assert "images/s (" in format_table(rows)

    # Segmentation's loader: a Cityscapes-layout folder, random crops of data.crop_size ([H, W] in the row).
    cfg_overrides = ["task=segmentation", "data=synthetic", f"cache_dir={tmp_path}", "measures=[data]",
                     "data_workers=[0]", "data.batch_size=2", "data_batches=2", "data.crop_size=[128,128]"]
    rows = run_benchmark(compose("benchmark", cfg_overrides))
    assert [(r["task"], r["image_size"], r["batch"]) for r in rows] == [("segmentation", [128, 128], 2)]
    assert rows[0]["value"] > 0 and json.loads(json.dumps(rows[0])) == rows[0] and "decoded_cache" not in rows[0]
    rows = run_benchmark(compose("benchmark", [*cfg_overrides, f"data.decoded_cache={tmp_path / 'decoded'}"]))
    assert rows[0]["decoded_cache"] == str(tmp_path / "decoded") and rows[0]["value"] > 0
    assert list((tmp_path / "decoded").rglob("*.npy"))  # the frames the measure read were kept decoded


@pytest.mark.parametrize(
    "task, overrides, expected",
    [
        ("segmentation", [], (512, 1024)),  # the Cityscapes training crop; prediction runs at 1024x2048
        ("segmentation", ["data=folder"], (512, 512)),  # the folder layout's crop
        ("segmentation", ["data.crop_size=[769,769]"], (896, 896)),  # padded to the size divisor, as in training
        ("segmentation", ["image_size=[256,512]"], (256, 512)),  # a given image_size is used for both
        ("segmentation", ["image_size=[256,512]", "train_image_size=128"], (128, 128)),
        ("detection", [], (512, 512)),  # D0's resolution, as prediction
        ("detection", ["backbone=b3"], (896, 896)),
        ("detection", ["train_image_size=[256,384]"], (256, 384)),
    ],
)
def test_training_measures_run_at_the_training_size(task, overrides, expected):
    from benchmarks.options import image_size, train_image_size
    from tasks.config import compose

    cfg = compose("benchmark", [f"task={task}", *overrides])
    assert train_image_size(cfg, task, image_size(cfg, task)) == expected


def test_train_boxes_sets_the_boxes_per_training_image():
    from benchmarks.train_step import train_inputs

    images = torch.zeros(2, 3, 128, 128)
    x, boxes, labels = train_inputs("detection", images, 2, (128, 128), 90, 0, 100)
    assert x.shape == (2, 3, 128, 128) and boxes.shape == (2, 100, 4) and labels.shape == (2, 100)
    assert (boxes[..., 2:] > boxes[..., :2]).all() and ((labels >= 0) & (labels < 90)).all()
    assert train_inputs("detection", images, 2, (128, 128), 90, 0)[1].shape == (2, 8, 4)  # the default


def test_calibrate_bn_sets_the_statistics_of_one_training_pass_and_restores_the_module():
    from benchmarks.calibration import calibrate_bn, calibration_images

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8, momentum=0.01), torch.nn.SiLU(),
                                torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    x = torch.randn(5, 3, 9, 9, generator=g)
    with torch.no_grad():
        h = model[0](x)
    calibrate_bn(model, x)
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(model[1].running_var, h.var((0, 2, 3), unbiased=True))
    with torch.no_grad():  # the second norm saw the first one's batch-normalised output, as in training
        h2 = model[3](model[2](torch.nn.functional.batch_norm(h, None, None, model[1].weight, model[1].bias, True)))
    torch.testing.assert_close(model[4].running_mean, h2.mean((0, 2, 3)))
    assert model[1].momentum == 0.01 and model[4].momentum == 0.1 and not model.training
    model.train()
    calibrate_bn(model, x)
    assert model.training
    assert [calibration_images(s) for s in ((128, 128), (256, 256), (512, 512), (896, 896), (1024, 2048))] == \
        [64, 16, 4, 2, 2]


def test_calibrated_statistics_give_the_random_detector_spread_logits():
    """A randomly initialised detector's activations shrink through its identity-statistics norms: its class logits
    are all its bias (every score ties). After calibration they spread: the top scores are (nearly) all distinct."""
    from benchmarks.calibration import calibrate_bn, calibration_images
    from inference.fast_paths import FlatDetector
    from tasks.config import compose
    from tasks.runner import build_model, build_task

    torch.manual_seed(0)
    cfg = compose("benchmark", ["image_size=128", "model.image_size=128"])
    task = build_task(cfg, build_model(cfg)).eval()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    detector = FlatDetector(task.model, task.num_classes)
    with torch.no_grad():
        before = detector(x)[0]
        calibrate_bn(task.model, torch.randn(calibration_images((128, 128)), 3, 128, 128))
        after = detector(x)[0]
    assert before.std() < 1e-4
    assert after.std() > 0.05 and after.abs().max() < 20  # spread, and not saturated
    top = after.reshape(2, -1).topk(100, dim=1).values
    # Float rounding may make a few neighbours equal (how many depends on the thread count); untrained, all 100 tie.
    assert all(row.unique().numel() >= 95 for row in top)


def test_count_ops_counts_kernels_and_host_synchronisations():
    from benchmarks.ops import count_ops

    x = torch.randn(5, 4)
    assert count_ops(lambda: x.t().reshape(-1).view(2, 10)).operations == 1  # the reshape of a transpose copies
    views = count_ops(lambda: x.view(-1)[3:])
    assert views.operations == 0 and views.views == 2  # views only: counted apart
    n = count_ops(lambda: (x * 2 + 1).sum().item())
    assert (n.operations, n.host_syncs) == (4, 1)  # mul, add, sum, item
    masked = count_ops(lambda: x[x > 0])
    assert masked.host_syncs == 1 and masked.operations >= 2
    assert count_ops(lambda: torch.where(x > 0, x, 0.0)).host_syncs == 0
    assert count_ops(lambda: torch.bincount(torch.tensor([0, 2, 2]))).host_syncs == 1
    assert count_ops(lambda: torch.tensor([1, 2]).repeat_interleave(torch.tensor([2, 1]))).host_syncs == 1


@pytest.mark.slow
@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_fit_measures_the_lightning_loop(task):
    """`fit` runs tools/train.py's Lightning loop (EMA, clipping, schedule, logging) on an in-memory batch: its
    images/s, and the operations of one whole step, which include the EMA update (5 operations)."""
    from benchmarks.harness import run_benchmark
    from benchmarks.report import format_table
    from tasks.config import compose

    small = ["device=cpu", "image_size=128", "model.image_size=128", "train_batch_size=2", "warmup=2", "iters=2",
             "rounds=2", "neck.channels=16", "neck.num_repeats=1", "head.depth=1", "backbone.drop_path_rate=0.0"]
    measures = "measures=[train,fit]" if task == "detection" else "measures=[fit]"
    rows = run_benchmark(compose("benchmark", [f"task={task}", measures, *small]))
    fit = rows[-1]
    assert (fit["measure"], fit["impl"], fit["batch"], fit["unit"]) == ("fit", "effdense", 2, "images/s")
    assert fit["value"] > 0 and fit["spread"] >= 0 and fit["ema"] is True and fit["gradient_clip_val"] == 10.0
    assert fit["lightning_precision"] == "32-true" and fit["channels_last"] is True
    assert fit["value"] == pytest.approx(2 / (fit["ms_per_call"] / 1000), rel=1e-2)
    if task == "detection":
        assert fit["vs_train"] == pytest.approx(fit["ms_per_call"] / rows[0]["ms_per_call"], abs=1e-3)
        assert fit["focal_loss"] == rows[0]["focal_loss"] == "torch"  # auto: the kernel only on CUDA
        assert fit["matching"] == rows[0]["matching"] == "torch"
    else:
        assert "focal_loss" not in fit and "matching" not in fit
    without_ema = run_benchmark(compose("benchmark", [f"task={task}", "measures=[fit]", "ema.enabled=false", *small]))[-1]
    assert without_ema["ema"] is False
    assert fit["operations"] - without_ema["operations"] == 5  # sub, mul, add (all floats), copy (ints), count
    assert fit["host_syncs"] == without_ema["host_syncs"]
    assert re.search(r"^fit\s+effdense\s+2\s+[\d.,]+\s+images/s", format_table(rows), re.MULTILINE)


@pytest.mark.slow
def test_fit_against_effdet_measures_effdets_step_alone_for_the_ratio():
    """`measures=[fit] compare=effdet`: effdet's bare training step is timed alone (this project's bare step is not,
    so its network is not compiled twice), and the loop's ratio is to it."""
    from benchmarks.harness import run_benchmark
    from benchmarks.report import format_table
    from tasks.config import compose

    rows = run_benchmark(compose("benchmark", ["compare=effdet", "measures=[fit]", "device=cpu", "image_size=128",
                                               "train_batch_size=2", "warmup=1", "iters=1", "rounds=2"]))
    assert [(r["measure"], r["impl"]) for r in rows] == [("train", "effdet"), ("fit", "effdense")]
    step, fit = rows
    assert step["value"] > 0 and step["batch"] == 2 and step["image_size"] == [128, 128] and "ratio" not in step
    assert fit["ratio"] == pytest.approx(fit["ms_per_call"] / step["ms_per_call"], abs=1e-3)
    assert fit["ratio_to"] == "effdet train step" and "vs_train" not in fit
    assert re.search(r"^train\s+effdet\s+2\s+[\d.,]+\s+images/s", format_table(rows), re.MULTILINE)


def test_fit_profile_prints_three_lightning_steps(capsys):
    from benchmarks.harness import run_benchmark
    from tasks.config import compose

    run_benchmark(compose("benchmark", [
        "measures=[fit]", "profile=true", "device=cpu", "image_size=128", "model.image_size=128",
        "train_batch_size=2", "warmup=3", "iters=1", "rounds=1", "neck.channels=16", "neck.num_repeats=1",
        "head.depth=1"]))
    err = capsys.readouterr().err
    assert re.search(r"### profile: fit, 3 Lightning steps \(wall [\d.]+ ms", err), err[-2000:]
    assert "aten::convolution" in err


@pytest.mark.slow
def test_fit_with_compilation_reports_no_operation_count():
    """Compiled code does not run under the counting dispatch mode, so a compiled `fit` reports no count."""
    from benchmarks.harness import run_benchmark
    from tasks.config import compose

    cfg = compose("benchmark", [
        "measures=[fit]", "fast.compile=true", "+task.module.compile_options.backend=eager", "device=cpu",
        "image_size=128", "model.image_size=128", "train_batch_size=2", "warmup=3", "iters=1", "rounds=2",
        "neck.channels=16", "neck.num_repeats=1", "head.depth=1"])
    fit = run_benchmark(cfg)[-1]
    assert fit["measure"] == "fit" and fit["compile"] is True and fit["value"] > 0
    assert fit["operations"] is None and fit["host_syncs"] is None


def test_sync_rules_for_host_values_and_copies(monkeypatch):
    """Without CUDA every read counts (as it would wait on a GPU); in a CUDA process a value kept on the host is
    read for free, but a copy from the device into pageable host memory still waits."""
    from benchmarks.ops import _is_sync

    host = torch.ones(())
    device = torch.empty((), device="meta")  # stands in for a GPU tensor
    assert _is_sync("_local_scalar_dense", (host,), {})
    assert _is_sync("copy_", (torch.empty(()), device), {})
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not _is_sync("_local_scalar_dense", (host,), {})
    assert _is_sync("_local_scalar_dense", (device,), {})
    assert _is_sync("copy_", (torch.empty(()), device), {})
    assert _is_sync("copy_", (torch.empty(()), device, True), {})  # non-blocking into pageable memory: waits too


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_segmentation_training_step_on_the_gpu():
    """The segmentation training step on the GPU (bf16, channels-last): no host synchronisation."""
    from benchmarks.harness import run_benchmark
    from tasks.config import compose

    rows = run_benchmark(compose("benchmark", [
        "task=segmentation", "backbone=b0", "device=cuda", "measures=[ops,train]", "fast.compile=false",
        "image_size=[256,512]", "train_batch_size=2", "warmup=3", "iters=2", "rounds=2"]))
    by = {r["measure"]: r for r in rows}
    assert by["ops"]["train_host_syncs"] == 0
    for measure in ("train",):
        assert by[measure]["value"] > 0 and by[measure]["precision"] == "bf16" and by[measure]["batch"] == 2
        assert by[measure]["image_size"] == [256, 512]


@pytest.mark.slow
def test_onnx_runtime_latency_rows_against_effdet():
    """latency_ort and latency_ort_int8 against effdet's PyTorch float32 Lite0 in the same run: the exported float32
    and int8 files timed in ONNX Runtime on the same image, each with its ratio to effdet's time."""
    from benchmarks.harness import run_benchmark
    from tasks.config import compose

    cfg = compose("benchmark", ["backbone=lite0", "compare=effdet", "device=cpu", "image_size=128", "warmup=1",
                                "iters=1", "rounds=1", "measures=[latency,latency_ort,latency_ort_int8]"])
    rows = run_benchmark(cfg)
    by = {(r["measure"], r["impl"]): r for r in rows}
    assert set(by) == {(m, i) for m in ("latency", "latency_ort", "latency_ort_int8") for i in ("effdense", "effdet")}
    fp32, int8 = by["latency_ort", "effdense"], by["latency_ort_int8", "effdense"]
    for measure, ours in (("latency_ort", fp32), ("latency_ort_int8", int8)):
        theirs = by[measure, "effdet"]
        assert ours["model"] == theirs["model"] == "tf_efficientdet_lite0"
        assert ours["unit"] == theirs["unit"] == "ms" and ours["batch"] == theirs["batch"] == 1
        assert ours["value"] > 0 and theirs["value"] > 0 and theirs["precision"] == "fp32"
        assert ours["ratio"] == pytest.approx(ours["ms_per_call"] / theirs["ms_per_call"], rel=1e-2)
        assert "ratio" not in theirs
        assert ours["runtime"] == "onnxruntime" and ours["intra_op_threads"] == torch.get_num_threads()
    assert fp32["precision"] == "fp32" and int8["precision"] == "int8"
    assert "synthetic" in int8["calibration"] and "calibration" not in fp32
    # The same float32 export both times; int8 weights make the file about a quarter of it (Lite0: 3.24M parameters).
    assert fp32["model_bytes"] == fp32["float32_bytes"] == int8["float32_bytes"] > 4 * 3_243_000
    assert 0.2 * fp32["model_bytes"] < int8["model_bytes"] < 0.4 * fp32["model_bytes"]


def test_onnx_runtime_latency_without_effdet_has_no_ratio():
    from benchmarks.harness import run_benchmark
    from tasks.config import compose

    cfg = compose("benchmark", ["backbone=timm", "backbone.name=test_efficientnet", "neck.channels=16",
                                "neck.num_repeats=1", "head.depth=1", "device=cpu", "image_size=64", "warmup=0", "iters=1", "rounds=1", "measures=[latency_ort]"])
    rows = run_benchmark(cfg)
    assert [(r["measure"], r["impl"]) for r in rows] == [("latency_ort", "effdense")]
    assert rows[0]["value"] > 0 and "ratio" not in rows[0] and rows[0]["model_bytes"] > 0
