"""Shared fixtures: small thread count, the synthetic COCO dataset written once per session."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """A small synthetic COCO-format folder (train2017/val2017), shared by the tests of one session."""
    from datasets import synthetic_coco_root

    cache = tmp_path_factory.mktemp("cache")
    return synthetic_coco_root(cache, num_train=16, num_val=8, seed=0)
