"""``task.module.cuda_graph=true``: the Lightning training step captured as one CUDA graph.

On the CPU the capture itself cannot run, so the task-level logic around it (manual optimization, the step count,
the learning-rate schedule on a device tensor, gradient clipping, the fused optimizer's on-device skip of
non-finite steps, the box padding, logging, checkpoints) runs with :class:`EagerSteps` in place of
:class:`tasks.captured_step.CapturedStep`: the same step function, called eagerly every time. The GPU tests capture and
replay for real and compare with eager training.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tasks.base import DenseTask
from tasks.config import compose
from tasks.runner import build_model, build_task, train, trainer_kwargs

# The runs compare the captured step with the eager one; BatchNorm statistics recomputed for the final weights (a
# forward pass of their own) are left out of these comparisons.
TINY = [
    "data=synthetic", "model.image_size=128", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
    "data.batch_size=4", "data.num_workers=0", "data.synthetic.num_train=16", "data.synthetic.num_val=4",
    "trainer.enable_progress_bar=false", "trainer.max_epochs=3", "trainer.log_every_n_steps=1",
    "eval_after_train=false", "backbone.drop_path_rate=0.0", "task.module.precise_bn.enabled=false",
]
TINY_SEG = [
    "task=segmentation", "data=synthetic", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
    "data.batch_size=2", "data.num_workers=0", "data.synthetic.num_train=8", "data.synthetic.num_val=2",
    "trainer.enable_progress_bar=false", "trainer.max_epochs=3", "trainer.log_every_n_steps=1",
    "eval_after_train=false", "backbone.drop_path_rate=0.0", "task.module.precise_bn.enabled=false",
]

#: AdamW for comparisons of two runs. Adam scales every update to about the learning rate, also that of a weight
#: whose gradient is rounding noise (a norm's bias followed by another norm: its true gradient is 0), so a rounding
#: difference between two optimizer implementations becomes a learning-rate-sized difference there. A larger eps
#: keeps such updates small and leaves those of real gradients as they are.
ADAMW = ["optim=adamw", "+task.module.optimizer.eps=1e-3"]


class EagerSteps:
    """Stands in for :class:`tasks.captured_step.CapturedStep` on the CPU: calls the step function eagerly each time, and
    after ``warmup`` calls holds the shapes a capture would have fixed (``matches``), counting the calls a graph
    would have replayed (``replays``) and those run eagerly for other shapes (``eager_calls``)."""

    def __init__(self, fn, *, warmup: int = 3) -> None:
        self.fn, self.warmup, self.calls = fn, warmup, 0
        self.static_inputs: list[torch.Tensor] = []
        self.replays = self.eager_calls = 0
        EagerSteps.last = self

    @property
    def captured(self) -> bool:
        return bool(self.static_inputs)

    @property
    def captures_next(self) -> bool:
        return not self.captured and self.calls >= self.warmup

    def matches(self, inputs) -> bool:
        return not self.static_inputs or [t.shape for t in inputs] == [t.shape for t in self.static_inputs]

    def __call__(self, *inputs):
        if self.calls >= self.warmup:
            if not self.static_inputs:
                self.static_inputs = [t.clone() for t in inputs]
            assert self.matches(inputs), "the task must not replay other shapes"
            self.replays += 1
        self.calls += 1
        return self.fn(*inputs)

    def run_eagerly(self, *inputs):
        self.eager_calls += 1
        self.calls += 1
        return self.fn(*inputs)


@pytest.fixture
def eager_capture(monkeypatch):
    import tasks.captured_step

    monkeypatch.setattr(tasks.captured_step, "CapturedStep", EagerSteps)
    monkeypatch.setattr(DenseTask, "_check_cuda_graph_setup", lambda self: None)


@pytest.fixture
def compiled_calls(monkeypatch):
    """Whether the model was compiled, at each training forward pass of a DenseTask (a list, filled as they run)."""
    calls: list[bool] = []
    original = DenseTask.run_model

    def run_model(self, images):
        if self.training:
            calls.append(self.model_compiled)
        return original(self, images)

    monkeypatch.setattr(DenseTask, "run_model", run_model)
    return calls


@pytest.fixture
def recorded_step(monkeypatch):
    """The real :class:`tasks.captured_step.CapturedStep`, recording the last one made: ``recorded_step["step"]``."""
    import tasks.captured_step

    steps = {}
    original = tasks.captured_step.CapturedStep

    class Recording(original):
        def __init__(self, fn, **kwargs):
            super().__init__(fn, **kwargs)
            steps["step"] = self

    monkeypatch.setattr(tasks.captured_step, "CapturedStep", Recording)
    return steps


@pytest.fixture
def deterministic_cuda(monkeypatch):
    """Deterministic cuDNN, no autotuning, no TF32: two CUDA runs comparable to float32 rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _run(tmp_path: Path, name: str, overrides: list[str], base=TINY):
    run_dir = tmp_path / name
    train(compose("train", [*base, f"cache_dir={tmp_path / 'cache'}", *overrides]), run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    with open(run_dir / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    return ckpt, losses


def _assert_same_state(a: dict, b: dict, **tol) -> None:
    assert list(a) == list(b)
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(b[key], value, msg=lambda m, key=key: f"{key}: {m}", **tol)
        else:
            assert torch.equal(b[key], value), key


def test_options_are_checked():
    for mode in ("reduce-overhead", "max-autotune"):  # torch.compile's own CUDA graphs inside the captured step
        with pytest.raises(Exception, match="take CUDA graphs of its own inside it"):
            cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true", "task.module.compile=true",
                                    f"+task.module.compile_options.mode={mode}"])
            build_task(cfg, build_model(cfg))
    for option in ("options={triton.cudagraphs: true}", "backend=cudagraphs"):
        with pytest.raises(Exception, match="take CUDA graphs of its own inside it"):
            cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true", "task.module.compile=true",
                                    f"+task.module.compile_options.{option}"])
            build_task(cfg, build_model(cfg))
    # Inductor's own CUDA graphs are switched off explicitly (an environment variable could turn them on).
    cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true", "task.module.compile=true"])
    assert build_task(cfg, build_model(cfg)).compile_options == {"dynamic": False,
                                                                 "options": {"triton.cudagraphs": False}}
    cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true", "task.module.compile=true",
                            "+task.module.compile_options.mode=max-autotune-no-cudagraphs"])
    options = build_task(cfg, build_model(cfg)).compile_options
    assert "mode" not in options and options["options"]["max_autotune"] is True
    assert options["options"]["triton.cudagraphs"] is False
    cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true", "task.module.compile=true",
                            "+task.module.compile_options.backend=aot_eager"])
    assert build_task(cfg, build_model(cfg)).compile_options == {"dynamic": False, "backend": "aot_eager"}
    cfg = compose("train", ["data=synthetic", "task.module.compile=true"])  # without cuda_graph: as given
    assert build_task(cfg, build_model(cfg)).compile_options == {"dynamic": False}
    with pytest.raises(Exception, match="cuda_graph_max_boxes must be >= 1"):
        cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true", "task.module.cuda_graph_max_boxes=0"])
        build_task(cfg, build_model(cfg))


def test_gradient_clipping_moves_from_the_trainer_to_the_task():
    cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true", "trainer.gradient_clip_val=3.5"])
    assert "gradient_clip_val" not in trainer_kwargs(cfg, training=True)
    assert build_task(cfg, build_model(cfg)).gradient_clipping == (3.5, "norm")
    plain = compose("train", ["data=synthetic", "trainer.gradient_clip_val=3.5"])
    assert trainer_kwargs(plain, training=True)["gradient_clip_val"] == 3.5
    assert build_task(plain, build_model(plain)).gradient_clipping is None
    # Lightning's rule: either algorithm, in any case; anything else is an error, not clipping by value.
    for given, algorithm in (("Norm", "norm"), ("VALUE", "value"), ("value", "value")):
        cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true",
                                f"trainer.gradient_clip_algorithm={given}"])
        assert build_task(cfg, build_model(cfg)).gradient_clipping == (10.0, algorithm)
    cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true", "trainer.gradient_clip_algorithm=nrom"])
    with pytest.raises(ValueError, match="gradient_clip_algorithm must be 'norm' or 'value', got 'nrom'"):
        build_task(cfg, build_model(cfg))


@pytest.mark.parametrize("precision, reason", [("16-mixed", " (fp16 loss scaling decides on the host)"),
                                               ("64-true", "")])
def test_an_unsupported_precision_is_named(precision, reason):
    from types import SimpleNamespace

    cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true"])
    task = build_task(cfg, build_model(cfg))
    task._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), world_size=1,
                                    precision=precision, accumulate_grad_batches=1)
    with pytest.raises(ValueError) as err:
        task._check_cuda_graph_setup()
    problem = f"it supports precision 32-true, bf16-mixed and bf16-true, not {precision}{reason}"
    assert f"as a CUDA graph: {problem}. Set task.module.cuda_graph=false" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cuda_graph_on_the_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA device, and this run trains on cpu.*cuda_graph=false"):
        _run(tmp_path, "run", ["trainer.accelerator=cpu", "trainer.max_steps=1", "task.module.cuda_graph=true"])


def test_boxes_are_padded_to_the_fixed_count():
    cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true", "task.module.cuda_graph_max_boxes=6"])
    task = build_task(cfg, build_model(cfg))
    batch = {"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "boxes": torch.ones(2, 4, 4),
             "labels": torch.tensor([[0, 1, -1, -1], [2, 3, 4, 5]])}
    _, boxes, labels = task.graph_inputs(batch)
    assert boxes.shape == (2, 6, 4) and labels.shape == (2, 6)
    assert torch.equal(boxes[:, :4], batch["boxes"]) and not boxes[:, 4:].any()
    assert torch.equal(labels[:, :4], batch["labels"]) and (labels[:, 4:] == -1).all()
    too_many = {**batch, "boxes": torch.ones(2, 7, 4), "labels": torch.zeros(2, 7, dtype=torch.long)}
    _, boxes, labels = task.graph_inputs(too_many)  # left as they are: this step runs eagerly
    assert boxes.shape == (2, 7, 4) and labels.shape == (2, 7)


@pytest.mark.slow
def test_a_batch_the_graph_cannot_replay_runs_eagerly(tmp_path, eager_capture, caplog):
    """Batches with more boxes than cuda_graph_max_boxes run the step eagerly (with one warning) and train as the
    eager loop does; the others replay."""
    common = ["trainer.accelerator=cpu", "trainer.max_steps=8"]  # synthetic images hold up to 4 objects
    eager_ckpt, eager_losses = _run(tmp_path, "eager", [*common, "+task.module.optimizer.fused=true"])
    with caplog.at_level("WARNING"):
        graph_ckpt, graph_losses = _run(tmp_path, "graph", [*common, "task.module.cuda_graph=true",
                                                            "task.module.cuda_graph_max_boxes=2"])
    step = EagerSteps.last
    assert step.eager_calls >= 1 and step.replays >= 1 and step.calls == 8
    assert caplog.text.count("runs eagerly") == 1 and "cuda_graph_max_boxes" in caplog.text
    assert graph_losses == eager_losses
    _assert_same_state(eager_ckpt["state_dict"], graph_ckpt["state_dict"], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("base", [TINY, TINY_SEG], ids=["detection", "segmentation"])
def test_captured_step_logic_trains_like_the_eager_loop(tmp_path, eager_capture, base):
    """The captured step's function, run eagerly, trains exactly as Lightning's automatic loop with the same fused
    optimizer: same losses, weights, step count and schedule (gradient clipping included)."""
    common = ["trainer.accelerator=cpu", "trainer.max_steps=5", "trainer.gradient_clip_val=0.5"]
    eager_ckpt, eager_losses = _run(tmp_path, "eager", [*common, "+task.module.optimizer.fused=true"], base)
    graph_ckpt, graph_losses = _run(tmp_path, "graph", [*common, "task.module.cuda_graph=true"], base)
    assert graph_ckpt["global_step"] == eager_ckpt["global_step"] == 5
    assert len(graph_losses) == len(eager_losses) == 5
    assert graph_losses == eager_losses
    _assert_same_state(eager_ckpt["state_dict"], graph_ckpt["state_dict"], rtol=0, atol=0)
    # The checkpoint stores plain learning rates and the schedule's position, as an eager run does.
    for a, b in zip(eager_ckpt["optimizer_states"][0]["param_groups"], graph_ckpt["optimizer_states"][0]["param_groups"]):
        assert isinstance(b["lr"], float) and b["lr"] == pytest.approx(a["lr"], abs=1e-7)
    assert graph_ckpt["lr_schedulers"][0]["last_epoch"] == eager_ckpt["lr_schedulers"][0]["last_epoch"] == 5
    assert graph_ckpt["lr_schedulers"][0]["_last_lr"] == pytest.approx(eager_ckpt["lr_schedulers"][0]["_last_lr"])
    assert all(isinstance(v, float) for v in graph_ckpt["lr_schedulers"][0]["_last_lr"])


@pytest.mark.slow
def test_captured_step_logic_with_compile_trains_like_the_compiled_eager_loop(tmp_path, eager_capture,
                                                                              compiled_calls):
    """With task.module.compile too, the captured step runs the compiled network (here torch.compile's AOTAutograd
    path without code generation, which the CPU runs in seconds) and trains as the compiled automatic loop does."""
    compiled = compiled_calls
    common = ["trainer.accelerator=cpu", "trainer.max_steps=5", "task.module.compile=true",
              "+task.module.compile_options.backend=aot_eager"]
    eager_ckpt, eager_losses = _run(tmp_path, "eager", [*common, "+task.module.optimizer.fused=true"])
    compiled.clear()
    graph_ckpt, graph_losses = _run(tmp_path, "graph", [*common, "task.module.cuda_graph=true"])
    assert compiled == [True] * 5  # every training step's network ran through torch.compile
    assert EagerSteps.last.replays == 2
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    _assert_same_state(eager_ckpt["state_dict"], graph_ckpt["state_dict"], rtol=1e-4, atol=1e-6)
    assert list(graph_ckpt["state_dict"]) == list(eager_ckpt["state_dict"])  # the plain model's keys


@pytest.mark.slow
def test_captured_step_logic_trains_adamw_like_the_eager_loop(tmp_path, eager_capture):
    """AdamW's groups are made capturable for the capture (its step counters on the device), and train as the eager
    loop's fused AdamW does; the checkpoint stores them as an eager run does (capturable off)."""
    common = ["trainer.accelerator=cpu", "trainer.max_steps=5", *ADAMW]
    eager_ckpt, eager_losses = _run(tmp_path, "eager", [*common, "+task.module.optimizer.fused=true"])
    graph_ckpt, graph_losses = _run(tmp_path, "graph", [*common, "task.module.cuda_graph=true"])
    # The same up to float32 rounding: the captured step's learning rate is a float32 tensor (eager: a Python float).
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    _assert_same_state(eager_ckpt["state_dict"], graph_ckpt["state_dict"], rtol=1e-4, atol=1e-6)
    groups = graph_ckpt["optimizer_states"][0]["param_groups"]
    assert all(g["fused"] is True and g["capturable"] is False and isinstance(g["lr"], float) for g in groups)


def test_resumed_optimizer_state_is_prepared_for_the_capture():
    """An optimizer whose state comes from a run without the captured step (fused off, a float learning rate) gets
    what the capture needs. (Its step counters, on the host, move to the parameters' device: a CUDA-only case, run by
    the GPU test that resumes captured AdamW from an eager checkpoint.)"""
    from tasks.captured_training import _prepare_for_capture

    w = torch.nn.Parameter(torch.ones(3))
    plain = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(3)
    plain.step()
    assert plain.state[w]["step"].device.type == "cpu" and plain.param_groups[0]["fused"] is None
    resumed = torch.optim.Adam([w], lr=0.1, fused=True)
    resumed.load_state_dict(plain.state_dict())  # the saved groups replace the new optimizer's settings
    assert not resumed.param_groups[0]["fused"]
    _prepare_for_capture(resumed, torch.device("cpu"))
    group = resumed.param_groups[0]
    assert group["fused"] is True and group["capturable"] is True and group["foreach"] is None
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].dtype == torch.float32 and float(group["lr"]) == pytest.approx(0.1)
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9, foreach=True)
    _prepare_for_capture(sgd, torch.device("cpu"))
    assert sgd.param_groups[0]["fused"] is True and sgd.param_groups[0]["foreach"] is None


@pytest.mark.slow
def test_a_skipped_first_step_leaves_no_momentum_buffers(tmp_path, eager_capture, nan_losses, monkeypatch):
    """The fused SGD step creates its momentum buffers uninitialised and fills them in its kernel, which a
    non-finite step skips: the task drops them, so the next step starts them again from its own gradient."""
    import lightning as L

    from tasks import runner

    seen = []

    class Buffers(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            seen.append(sum(opt.state.get(p, {}).get("momentum_buffer") is not None
                            for g in opt.param_groups for p in g["params"]))

    original = runner._callbacks
    monkeypatch.setattr(runner, "_callbacks", lambda *args: [*original(*args), Buffers()])
    nan_losses({1})
    ckpt, _ = _run(tmp_path, "run", ["trainer.accelerator=cpu", "task.module.cuda_graph=true", "trainer.max_steps=2"])
    assert seen[0] == 0 and seen[1] > 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("num_train", [16, 12], ids=["4-batch-epochs", "validation-after-the-warm-up"])
def test_no_capture_while_the_skipped_warm_up_left_no_momentum_buffers(tmp_path, eager_capture, nan_losses,
                                                                       num_train):
    """All three warm-up steps skipped: the fourth step, the first to update, runs eagerly (it creates the buffers
    as a first step), and the fifth is captured (a graph captured without buffers would apply the first-step rule,
    buffer = gradient, at every replay). Also when validation ran after the third step (epochs of 3 batches) and
    set every gradient to None."""
    nan_losses({1, 2, 3})
    ckpt, _ = _run(tmp_path, "run", ["trainer.accelerator=cpu", "task.module.cuda_graph=true", "trainer.max_steps=6",
                                     f"data.synthetic.num_train={num_train}"])
    step = EagerSteps.last
    assert step.eager_calls == 1 and step.replays == 2 and step.calls == 6
    state = ckpt["optimizer_states"][0]["state"]
    assert sum("momentum_buffer" in s for s in state.values()) > 0


@pytest.mark.slow
def test_a_batch_wider_than_the_padding_is_never_captured(tmp_path, eager_capture, caplog):
    """Every batch holds more boxes than cuda_graph_max_boxes: no batch is captured (a graph of one such batch would
    fix its box count); after the three warm-up steps they run eagerly, with one warning."""
    with caplog.at_level("WARNING"):
        _run(tmp_path, "run", ["trainer.accelerator=cpu", "task.module.cuda_graph=true", "trainer.max_steps=5",
                               "task.module.cuda_graph_max_boxes=1"])  # every synthetic batch has 2 or 3
    step = EagerSteps.last
    assert not step.captured and step.calls == 5 and step.eager_calls == 2
    assert caplog.text.count("runs eagerly") == 1


class _Uncopyable:
    """Stands in for a captured step: like a CUDA graph, it cannot be copied."""

    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle a CUDA graph")


def test_a_copy_of_the_task_has_no_captured_step():
    """The EMA's averaged copy and a Predictor deep-copy the task: the copy gets no captured step (a graph cannot be
    copied, and it steps the original's optimizer); the original keeps its own until training ends."""
    import copy

    cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true"])
    task = build_task(cfg, build_model(cfg))
    step = _Uncopyable()
    task._captured_step, task._unread_step, task._warned_shapes = step, 7, True
    twin = copy.deepcopy(task)
    assert twin._captured_step is None and twin._unread_step == -1 and not twin._warned_shapes
    assert task._captured_step is step and task._unread_step == 7
    task._unread_step = -1  # no flag pending: on_train_end reads nothing
    task.on_train_end()  # the graph and its memory go with the fit
    assert task._captured_step is None


def test_the_capture_lets_other_threads_use_cuda(monkeypatch):
    """The data loader's pin-memory thread pins and allocates during the capture: the capture must be
    thread-local, as the default (global) mode fails on any other thread's CUDA call."""
    import contextlib

    import tasks.captured_step

    modes = []

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        modes.append(capture_error_mode)
        yield

    monkeypatch.setattr(tasks.captured_step, "_check_cuda_inputs", lambda inputs, what: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    step = tasks.captured_step.CapturedStep(lambda x: x * 2, warmup=1)
    step.capture(torch.ones(2))
    assert modes == ["thread_local"] and step.captured and torch.equal(step.static_output, torch.full((2,), 2.0))


def test_a_new_fit_captures_a_new_graph():
    cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true"])
    task = build_task(cfg, build_model(cfg))
    task._captured_step, task._unread_step, task._warned_shapes = object(), 7, True
    task.on_fit_start()
    assert task._captured_step is None and task._unread_step == -1 and not task._warned_shapes


def test_only_a_padded_batch_is_captured():
    cfg = compose("train", ["data=synthetic", "task.module.cuda_graph=true", "task.module.cuda_graph_max_boxes=3"])
    task = build_task(cfg, build_model(cfg))
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    assert task.graph_conforms(task.graph_inputs({"images": images, "boxes": torch.ones(1, 2, 4),
                                                  "labels": torch.zeros(1, 2, dtype=torch.long)}))
    assert not task.graph_conforms(task.graph_inputs({"images": images, "boxes": torch.ones(1, 4, 4),
                                                      "labels": torch.zeros(1, 4, dtype=torch.long)}))


class _Kill(Exception):
    pass


def _run_killed_at(tmp_path: Path, monkeypatch, name: str, overrides: list[str], step: int) -> None:
    """Train until ``step`` optimizer steps are done, then die (the schedule is that of the whole run)."""
    import lightning as L

    from tasks import runner

    class KillAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step:
                raise _Kill(f"killed before step {step + 1}")

    original = runner._callbacks
    monkeypatch.setattr(runner, "_callbacks", lambda *args: [*original(*args), KillAt()])
    try:
        with pytest.raises(_Kill):
            _run(tmp_path, name, overrides)
    finally:
        monkeypatch.setattr(runner, "_callbacks", original)


@pytest.mark.slow
def test_captured_step_resumes_to_the_same_weights(tmp_path, eager_capture, monkeypatch):
    """A 6-step run, and one killed before step 5 (last.ckpt every 2 steps) then resumed to 6 steps, end with the
    same weights and EMA weights: the resumed run's learning rates go back onto the device."""
    base = ["trainer.accelerator=cpu", "task.module.cuda_graph=true", "trainer.max_steps=6",
            "checkpoint.every_n_train_steps=2"]
    full, _ = _run(tmp_path, "full", base)
    _run_killed_at(tmp_path, monkeypatch, "part", base, 4)
    resumed, _ = _run(tmp_path, "part", [*base, "ckpt_path=last"])
    assert full["global_step"] == resumed["global_step"] == 6
    for key in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        _assert_same_state(full[key], resumed[key], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("captured_first, killed_at", [(False, 2), (True, 4)],
                         ids=["eager-then-captured-mid-epoch", "captured-then-eager-end-of-epoch"])
def test_a_checkpoint_resumes_across_the_captured_step(tmp_path, eager_capture, monkeypatch, captured_first,
                                                        killed_at):
    """A run trained without the captured step (plain AdamW) resumes with it, and the other way round: the step
    count (Lightning keeps one per kind of optimization), the optimizer's counters and moments carry over, the
    optimizer switches to (or keeps) the fused step, and the weights end as an uninterrupted eager run's do.
    (An epoch has 4 steps: killed after 2, the run resumes mid-epoch, and its 4 steps reach the capture.)"""
    base = ["trainer.accelerator=cpu", "checkpoint.every_n_train_steps=2", *ADAMW, "trainer.max_steps=6"]
    graph = ["task.module.cuda_graph=true"]
    full, _ = _run(tmp_path, "full", base)
    _run_killed_at(tmp_path, monkeypatch, "part", [*base, *(graph if captured_first else [])], killed_at)
    resumed, losses = _run(tmp_path, "part", [*base, "ckpt_path=last", *([] if captured_first else graph)])
    assert resumed["global_step"] == 6
    assert len(losses) == 6 - killed_at  # the resumed run's own steps (its metrics.csv starts again)
    if not captured_first:
        assert EagerSteps.last.replays >= 1
    groups = resumed["optimizer_states"][0]["param_groups"]
    assert all(g["fused"] is True and not g["capturable"] and isinstance(g["lr"], float) for g in groups)
    steps = {float(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert steps == {6.0}
    for key in ("state_dict", "current_model_state"):  # fused and foreach AdamW round differently
        _assert_same_state(full[key], resumed[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_on_the_device_and_counted(tmp_path, eager_capture, nan_losses, caplog):
    # A constant learning rate and no EMA: the checkpoint's weights after 2 clean steps are comparable.
    common = ["trainer.accelerator=cpu", "task.module.cuda_graph=true", "trainer.max_steps=4", "ema.enabled=false",
              "task.module.warmup_steps=0", "task.module.min_lr_factor=1.0"]
    clean, _ = _run(tmp_path, "clean", [*common, "trainer.max_steps=2"])
    nan_losses({3, 4})  # the last two steps: the last one is counted when training ends
    with caplog.at_level("WARNING"):
        skipped, _ = _run(tmp_path, "skipped", common)
    assert "step skipped (1 skipped so far, 1 in a row)" in caplog.text
    assert "(2 skipped so far, 2 in a row)" in caplog.text
    assert skipped["global_step"] == 4
    # Neither update happened: the weights are those after the two clean steps (the norms' running statistics
    # moved in the forward passes, as in an eager skipped step).
    for key, value in clean["state_dict"].items():
        if "running_" not in key and "num_batches_tracked" not in key:
            torch.testing.assert_close(skipped["state_dict"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_training_stops_when_the_captured_loss_stays_nonfinite(tmp_path, eager_capture, nan_losses):
    from tasks.nonfinite import NonFiniteLossError

    nan_losses(set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match="NaN/inf for 3 steps in a row"):
        _run(tmp_path, "run", ["trainer.accelerator=cpu", "task.module.cuda_graph=true", "trainer.max_steps=10",
                               "task.module.max_nonfinite_steps=3"])


# ---------------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("base", [TINY, TINY_SEG], ids=["detection", "segmentation"])
def test_captured_training_equals_eager_training_on_the_gpu(tmp_path, deterministic_cuda, recorded_step, base):
    """Three eager warm-up steps, the capture, then replays: the losses and weights of eager training with the
    same fused optimizer (float32, deterministic cuDNN, no TF32), and the graph really replayed."""
    steps = recorded_step
    common = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=32-true", "trainer.max_steps=7",
              "trainer.gradient_clip_val=0.5", "trainer.benchmark=false", "task.module.channels_last=true"]
    eager_ckpt, eager_losses = _run(tmp_path, "eager", [*common, "+task.module.optimizer.fused=true"], base)
    graph_ckpt, graph_losses = _run(tmp_path, "graph", [*common, "task.module.cuda_graph=true"], base)
    assert steps["step"].captured and steps["step"].calls == 7
    assert graph_ckpt["global_step"] == 7
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    _assert_same_state(eager_ckpt["state_dict"], graph_ckpt["state_dict"], rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_adamw_training_resumes_from_an_eager_checkpoint_on_the_gpu(tmp_path, monkeypatch):
    """AdamW captured for real (capturable groups, step counters on the device), resumed from a checkpoint of a run
    without the captured step: 3 eager warm-up steps, the capture, replays."""
    base = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed", "optim=adamw",
            "trainer.max_steps=9", "checkpoint.every_n_train_steps=2"]
    _run_killed_at(tmp_path, monkeypatch, "run", base, 2)
    ckpt, losses = _run(tmp_path, "run", [*base, "ckpt_path=last", "task.module.cuda_graph=true"])
    assert ckpt["global_step"] == 9 and len(losses) == 7 and all(torch.isfinite(torch.tensor(losses)))
    assert {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {9.0}
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_training_in_bf16_runs_on_the_gpu(tmp_path):
    ckpt, losses = _run(tmp_path, "bf16", ["trainer.accelerator=gpu", "trainer.devices=1",
                                           "trainer.precision=bf16-mixed", "trainer.max_steps=6",
                                           "task.module.cuda_graph=true"])
    assert ckpt["global_step"] == 6 and len(losses) == 6
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_training_of_the_compiled_network_on_the_gpu(tmp_path, deterministic_cuda, recorded_step,
                                                              compiled_calls):
    """task.module.cuda_graph with task.module.compile (inductor): the network is compiled in the warm-up steps, the
    graph captures its kernels and replays them, and training matches the compiled automatic loop with the same fused
    optimizer (float32, deterministic cuDNN, no TF32; the same inductor kernels in both)."""
    steps, compiled = recorded_step, compiled_calls
    common = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=32-true", "trainer.max_steps=7",
              "trainer.gradient_clip_val=0.5", "trainer.benchmark=false", "task.module.channels_last=true",
              "task.module.compile=true"]
    eager_ckpt, eager_losses = _run(tmp_path, "eager", [*common, "+task.module.optimizer.fused=true"])
    compiled.clear()
    graph_ckpt, graph_losses = _run(tmp_path, "graph", [*common, "task.module.cuda_graph=true"])
    assert steps["step"].captured and steps["step"].calls == 7 and graph_ckpt["global_step"] == 7
    assert compiled == [True] * 4  # the three warm-up steps and the capture; the replays call no Python
    assert graph_losses[0] == pytest.approx(eager_losses[0], rel=1e-5)
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3, abs=1e-5)
    _assert_same_state(eager_ckpt["state_dict"], graph_ckpt["state_dict"], rtol=1e-3, atol=1e-5)


def test_captured_step_checks_its_inputs(monkeypatch):
    """The capture needs CUDA tensors on one device; a replay needs the captured shapes and dtypes."""
    import tasks.captured_step

    step = tasks.captured_step.CapturedStep(lambda x: x * 2, warmup=1)
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors on one device, got inputs on \['cpu'\]"):
        step.capture(torch.ones(2))
    with pytest.raises(TypeError, match="non-empty sequence of tensors"):
        step.capture()
    step.static_inputs = [torch.ones(2)]
    with pytest.raises(ValueError, match=r"replays fixed shapes and dtypes: expected \(2,\) torch.float32, got \(3,\)"):
        step._load([torch.ones(3)])
    with pytest.raises(TypeError, match="expected 1 inputs, got 2"):
        step._load([torch.ones(2), torch.ones(2)])
