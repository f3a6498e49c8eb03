"""Training fast paths: ``trainer.precision: auto`` and ``task.module.channels_last: auto`` settle per device."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tasks.config import compose
from tasks.runner import build_model, build_task, trainer_kwargs


@pytest.fixture
def gpu_with_bf16(monkeypatch):
    """What the resolution sees on a CUDA machine whose GPU supports bfloat16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_config_defaults_are_auto():
    cfg = compose("train")
    assert cfg.trainer.precision == "auto"
    assert cfg.task.module.channels_last == "auto"
    assert compose("train", ["task=segmentation"]).task.module.channels_last == "auto"


def test_precision_auto_is_float32_on_the_cpu():
    cfg = compose("train")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert trainer_kwargs(cfg)["precision"] == "32-true"
    assert trainer_kwargs(cfg, training=False)["precision"] == "32-true"


def test_precision_auto_is_bf16_for_training_on_a_bf16_gpu(gpu_with_bf16):
    cfg = compose("train")
    assert trainer_kwargs(cfg, training=True)["precision"] == "bf16-mixed"
    # Evaluation keeps float32 metrics; an explicit CPU accelerator keeps float32 training.
    assert trainer_kwargs(cfg, training=False)["precision"] == "32-true"
    assert trainer_kwargs(compose("train", ["trainer.accelerator=cpu"]))["precision"] == "32-true"
    # A fork-based strategy must not see CUDA started before it forks: no capability query, float32.
    for strategy in ("ddp_fork", "ddp_notebook"):
        assert trainer_kwargs(compose("train", [f"trainer.strategy={strategy}"]))["precision"] == "32-true"


def test_precision_auto_without_bf16_support_is_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert trainer_kwargs(compose("train"))["precision"] == "32-true"


def test_explicit_precision_is_used_as_given(gpu_with_bf16):
    for value in ("32-true", "16-mixed", "bf16-mixed"):
        cfg = compose("train", [f"trainer.precision={value}"])
        assert trainer_kwargs(cfg)["precision"] == value
        assert trainer_kwargs(cfg, training=False)["precision"] == value
    # Everything else passes through unchanged.
    cfg = compose("train")
    kwargs = trainer_kwargs(cfg)
    assert {k: v for k, v in kwargs.items() if k != "precision"} == {
        k: v for k, v in cfg.trainer.items() if k != "precision"
    }


def _is_channels_last(model: torch.nn.Module) -> bool:
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    return all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def _task(channels_last):
    cfg = compose("train", ["data=synthetic", "model.image_size=128", f"task.module.channels_last={channels_last}"])
    return build_task(cfg, build_model(cfg))


def _attach(task, device: str) -> None:
    # setup() reads only the device the trainer's strategy will use.
    task._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))


def test_channels_last_auto_is_on_for_cuda_only():
    task = _task("auto")
    assert task.channels_last is False and not _is_channels_last(task.model)
    _attach(task, "cpu")
    task.setup("fit")
    assert task.channels_last is False and not _is_channels_last(task.model)
    x = task.normalize(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert not x.is_contiguous(memory_format=torch.channels_last)

    task = _task("auto")
    params = list(task.model.parameters())
    _attach(task, "cuda")
    task.setup("fit")
    assert task.channels_last is True and _is_channels_last(task.model)
    # The same parameter objects (an optimizer made later, or already, still holds them).
    assert all(a is b for a, b in zip(params, task.model.parameters()))
    x = task.normalize(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_explicit_values():
    assert _task("true").channels_last is True and _is_channels_last(_task("true").model)
    task = _task("false")
    _attach(task, "cuda")
    task.setup("fit")
    assert task.channels_last is False and not _is_channels_last(task.model)


def test_channels_last_bad_value_is_an_error():
    cfg = compose("train", ["data=synthetic", "model.image_size=128", "task.module.channels_last=sometimes"])
    with pytest.raises(Exception, match="channels_last must be true, false or auto"):
        build_task(cfg, build_model(cfg))


@pytest.mark.slow
def test_training_with_the_gpu_defaults_runs_on_the_cpu(tmp_path):
    """What `auto` picks on a GPU (bf16-mixed, channels-last), forced on the CPU: Lightning trains with it and the
    checkpoint holds ordinary float32 weights."""
    import csv

    from tasks.runner import train

    cfg = compose("train", [
        "data=synthetic", "model.image_size=128", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
        "data.batch_size=4", "data.num_workers=0", "data.synthetic.num_train=12", "data.synthetic.num_val=4",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=3",
        "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "eval_after_train=false",
        "trainer.precision=bf16-mixed", "task.module.channels_last=true", f"cache_dir={tmp_path / 'cache'}",
    ])
    run = tmp_path / "run"
    train(cfg, run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    weights = [v for k, v in ckpt["state_dict"].items() if k.startswith("model.") and v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)
    convs = [v for k, v in ckpt["state_dict"].items() if k.startswith("model.") and v.dim() == 4 and v.shape[-1] == 3]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)  # trained channels-last
    with open(run / "logs" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)


def test_compile_options_are_checked():
    for override, message in (("task.module.compile=sometimes", "compile must be true or false"),
                              ("+task.module.compile_options.speed=fast", r"compile_options: unknown key\(s\) \['speed'\]")):
        cfg = compose("train", ["data=synthetic", "model.image_size=128", override])
        with pytest.raises(Exception, match=message):
            build_task(cfg, build_model(cfg))


def test_compile_happens_in_setup_for_fit_only():
    cfg = compose("train", ["data=synthetic", "model.image_size=128", "task.module.compile=true",
                            "+task.module.compile_options.backend=eager"])
    task = build_task(cfg, build_model(cfg))
    keys = list(task.state_dict())
    _attach(task, "cpu")
    task.setup("validate")
    assert not task.model_compiled  # evaluation stays eager
    task.setup("fit")
    assert task.model_compiled and task.compile_options == {"dynamic": False, "backend": "eager"}
    assert list(task.state_dict()) == keys  # checkpoints keep the plain model's keys


@pytest.mark.slow
def test_compiled_training_matches_eager_training(tmp_path):
    """``task.module.compile=true`` trains through torch.compile (here the AOTAutograd path without code
    generation, which the CPU runs in seconds) with the same losses and weights as eager training."""
    import csv

    from torch._dynamo.utils import counters

    from tasks.runner import train

    def run(name, extra):
        cfg = compose("train", [
            "data=synthetic", "model.image_size=128", "neck.channels=16", "neck.num_repeats=1", "head.depth=1",
            "data.batch_size=4", "data.num_workers=0", "data.synthetic.num_train=12", "data.synthetic.num_val=4",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=3",
            "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "eval_after_train=false",
            "backbone.drop_path_rate=0.0", f"cache_dir={tmp_path / 'cache'}", *extra,
        ])
        train(cfg, tmp_path / name)
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        with open(tmp_path / name / "logs" / "metrics.csv") as f:
            losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
        return ckpt["state_dict"], losses

    eager_state, eager_losses = run("eager", [])
    # Another test of this process may have compiled the same network already: without a reset, torch.compile would
    # reuse that code and count no new frame.
    torch._dynamo.reset()
    frames = counters["frames"]["ok"]
    compiled_state, compiled_losses = run("compiled", ["task.module.compile=true",
                                                       "+task.module.compile_options.backend=aot_eager"])
    assert counters["frames"]["ok"] > frames  # the model really went through torch.compile
    assert len(compiled_losses) == len(eager_losses) == 3
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert list(compiled_state) == list(eager_state)
    for key, value in eager_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(compiled_state[key], value, rtol=1e-3, atol=1e-4, msg=key)
        else:
            assert torch.equal(compiled_state[key], value), key


def test_compile_mode_and_options_together_are_an_error():
    cfg = compose("train", ["data=synthetic", "model.image_size=128", "+task.module.compile_options.mode=max-autotune",
                            "+task.module.compile_options.options={trace.enabled: false}"])
    with pytest.raises(Exception, match="set mode or options, not both"):
        build_task(cfg, build_model(cfg))
