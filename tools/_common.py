"""Shared start-up for the command-line tools: import path, resolvers, clean error reporting."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from tasks.config import register_resolvers

register_resolvers()

CONFIG_PATH = str(ROOT / "configs")


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Report user errors (missing data, bad input, wrong checkpoint, and ``extra`` types) as one line and
    exit with status 2."""
    from backbones.timm_backbone import WeightsMismatchError
    from datasets.errors import DatasetError
    from tasks.base import NonFiniteLossError
    from tasks.checkpoint import CheckpointError

    try:
        yield
    except (DatasetError, CheckpointError, WeightsMismatchError, NonFiniteLossError, *extra) as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def one_line(err: BaseException) -> str:
    """The message of ``err``; for an error a data-loader worker raised (which PyTorch re-raises with the worker's
    whole traceback in the message), the original error's own message, which names the file."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        _, sep, message = last.partition(": ")
        return f"{message if sep else last} (in a data-loader worker)"
    return text
