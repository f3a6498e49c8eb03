"""``skip_bad``: skip bad samples instead of failing, and say what was skipped.

Problems found when a dataset is built (bad annotations, missing files) are counted by reason and reported in one
warning per dataset (:func:`skip_summary`). Problems found only when a sample is read (a corrupt or truncated
image, a mask with invalid values) are handled by :func:`first_readable`: the sample is replaced by the next
readable one (index order, wrapping around), which depends only on the files and so is deterministic, and the
file is named in a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from .errors import DatasetError

__all__ = ["describe_skips", "first_readable", "skip_summary"]

T = TypeVar("T")


def describe_skips(counts: Counter, noun: str) -> str:
    """``"3 annotations (2 box outside the image, 1 unknown category id)"``; most frequent reason first."""
    total = sum(counts.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{total} {noun}{'' if total == 1 else 's'} ({reasons})"


def skip_summary(source: str, **counts: Counter) -> str | None:
    """One line naming ``source`` and counting the skips of each kind (``annotation=Counter(...)``, ...); None when
    nothing was skipped."""
    parts = [describe_skips(c, noun) for noun, c in counts.items() if c and sum(c.values())]
    if not parts:
        return None
    return f"{source}: skipped {' and '.join(parts)} (data.skip_bad=true)"


def first_readable(
    index: int,
    size: int,
    load: Callable[[int], T],
    bad: dict[int, str],
    *,
    source: str,
    log: logging.Logger,
) -> T:
    """``load(index)``, or, when it raises :class:`DatasetError`, ``load`` of the next index that reads (wrapping
    around). Failures are remembered in ``bad`` (index -> message; per process) so that each bad file is tried and
    reported once; every new one is logged as a warning naming the file."""
    for step in range(size):
        i = (index + step) % size
        if i in bad:
            continue
        try:
            return load(i)
        except DatasetError as err:
            bad[i] = str(err)
            log.warning(
                "%s: skipped a bad sample (data.skip_bad=true; %d skipped so far in this process): %s",
                source, len(bad), err,
            )
    raise DatasetError(f"{source}: none of the {size} samples can be read (data.skip_bad=true skipped them all)")
