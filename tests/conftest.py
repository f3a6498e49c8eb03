"""Shared fixtures: small thread count, the synthetic COCO dataset written once per session."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest
import torch

# As the train/eval runners do: denormals make CPU steps of freshly initialised networks erratically slow.
# Set before any parallel work so the intra-op threads start with it.
torch.set_flush_denormal(True)
# One intra-op thread per pytest-xdist worker: several processes spinning OpenMP threads on 2 cores slow each
# other down many times over.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))
# Without a GPU, Triton kernels (layers.kernels.nms) run on CPU tensors in Triton's interpreter. Triton reads this
# when it is first imported, so it is set before any test can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _no_c_compiler(*args, **kwargs):
    raise RuntimeError("no C compiler")


@pytest.fixture
def refused_kernel(monkeypatch):
    """``check(module, attr, device, match, replacement=<raises 'no C compiler'>)``: with ``module.attr`` (what the
    kernel's first-run probe calls) replaced, ``module.usable(device)`` probes anew through
    ``layers.kernels.dispatch.checked``, warns with ``match`` and answers False."""
    from layers.kernels import dispatch as _triton

    def check(module, attr: str, device: torch.device, match: str, replacement=_no_c_compiler) -> None:
        monkeypatch.setattr(_triton, "_CHECKED", {})
        monkeypatch.setattr(module, attr, replacement)
        with pytest.warns(UserWarning, match=match):
            assert not module.usable(device)

    return check


@pytest.fixture
def nan_losses(monkeypatch):
    """``make(calls)``: the detection loss's total becomes NaN at the given calls of it (counted from 1)."""
    from heads.losses import DetectionLoss

    def make(nan_calls: set[int]) -> None:
        original = DetectionLoss.__call__
        calls = {"n": 0}

        def patched(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] in nan_calls:
                out = {**out, "loss": out["loss"] * float("nan")}
            return out

        monkeypatch.setattr(DetectionLoss, "__call__", patched)

    return make


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """A small synthetic COCO-format folder (train2017/val2017), shared by the tests of one session."""
    from datasets import synthetic_coco_root

    cache = tmp_path_factory.mktemp("cache")
    return synthetic_coco_root(cache, num_train=16, num_val=8, seed=0)
