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
    from hydra.errors import InstantiationException

    from backbones.timm_backbone import WeightsMismatchError
    from datasets.errors import DatasetError
    from tasks.checkpoint import CheckpointError
    from tasks.config_checks import ConfigError
    from tasks.nonfinite import NonFiniteLossError

    try:
        yield
    except (DatasetError, CheckpointError, WeightsMismatchError, NonFiniteLossError, ConfigError, *extra) as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except InstantiationException as err:
        # A constructor refused a setting (ValueError / TypeError, with a message naming it).
        cause = err.__cause__
        if not isinstance(cause, (ValueError, TypeError)):
            raise
        key = next((line.removeprefix("full_key: ") for line in str(err).splitlines() if line.startswith("full_key: ")),
                   "")
        message = one_line(cause)
        print(f"error: {key + ': ' if key and not message.startswith(key) else ''}{message}", file=sys.stderr,
              flush=True)
        raise SystemExit(2) from None


def check_command_line(config_name: str) -> None:
    """Compose ``config_name`` with the command line's overrides as Hydra will, and report what Hydra would refuse
    (an unknown option of a config group, an unknown key, a malformed override, a value that does not resolve, such
    as an unknown scale) as one line with exit status 2; Hydra itself reports them over several lines."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tasks.config import compose

    args = sys.argv[1:]
    if any(a.startswith("-") for a in args):  # Hydra's own flags (--help, --cfg, -m, ...): Hydra reads the line
        return
    overrides = [a for a in args if not a.lstrip("+~").startswith("hydra.")]
    try:
        OmegaConf.to_container(compose(config_name, overrides), resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        from datasets.errors import DatasetError

        # A value read from the data (the class names in a YOLO dataset's YAML): the data's own message.
        cause = err
        while cause is not None and not isinstance(cause, DatasetError):
            cause = cause.__cause__ or cause.__context__
        message = one_line(cause) if cause is not None else config_error_line(err)
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def config_error_line(err: BaseException) -> str:
    """A Hydra or OmegaConf error message in one line: its sentences joined, a list of options comma-separated."""
    parts, options = [], []
    text = str(err)
    cause = err.__cause__
    if cause is not None and str(cause).splitlines() and str(cause).splitlines()[0] not in text:
        text += "\n" + str(cause).splitlines()[0]  # e.g. "Key 'batch_sze' is not in struct"
    for line in text.split("\nConfig search path:")[0].splitlines():
        text = line.strip()
        if not text or text.startswith(("full_key:", "object_type=", "reference_type=")):
            continue
        (options if line.startswith("\t") else parts).append(text)
    message = " ".join(p if p.endswith((".", ":")) else p + ";" for p in parts).rstrip(";")
    return f"{message} {', '.join(options)}" if options else message


def one_line(err: BaseException) -> str:
    """The message of ``err``; for an error a data-loader worker raised (which PyTorch re-raises with the worker's
    whole traceback in the message), the original error's own message, which names the file."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        _, sep, message = last.partition(": ")
        return f"{message if sep else last} (in a data-loader worker)"
    return text
