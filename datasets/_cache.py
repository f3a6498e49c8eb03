"""Generated data folders written atomically and cached by a hash of their parameters (shared by every
synthetic generator)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import DatasetError

__all__ = ["MARKER", "cached_root", "read_marker", "write_atomically"]

#: Written last into every generated folder: its parameters, and the sign that the folder is complete.
MARKER = "synthetic.json"


def read_marker(root: Path) -> dict | None:
    """The parameters a complete generated folder was written with, or None (no folder, not complete, foreign)."""
    try:
        data = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_atomically(
    root: str | Path, params: dict, generate: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Fill ``root`` with ``generate(folder)`` unless it already holds a complete copy made with ``params``.

    ``generate`` writes into an empty temporary sibling folder; the marker (``params`` as JSON) is written last and
    the folder is then renamed into place, so an interrupted run never leaves a half-written folder and a
    concurrent writer of the same parameters is harmless. An existing folder that no generator wrote (no marker,
    not empty) is only replaced with ``overwrite=True``; otherwise :class:`DatasetError` names it.
    """
    root = Path(root).expanduser()
    if not overwrite and read_marker(root) == params:
        return root
    foreign = root.exists() and (not root.is_dir() or (read_marker(root) is None and any(root.iterdir())))
    if foreign and not overwrite:
        raise DatasetError(
            f"{root}: exists and is not a synthetic dataset written by this generator; refusing to replace it "
            "(choose another folder or pass overwrite=True)"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        generate(tmp)
        (tmp / MARKER).write_text(json.dumps(params))  # written last: marks the copy complete
        if root.exists():
            if not overwrite and read_marker(root) == params:
                return root  # another process finished the same dataset first
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(root, old)
            os.replace(tmp, root)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            try:
                os.replace(tmp, root)
            except OSError:
                if read_marker(root) != params:  # not a concurrent writer of the same dataset: a real error
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def cached_root(
    cache_dir: str | Path,
    *,
    prefix: str,
    writer: Callable[..., Path],
    normalize: Callable[..., dict],
    params: Mapping,
) -> Path:
    """Call ``writer(cache_dir / "<prefix>-<hash>", **params)`` and return its folder.

    ``params`` are keyword arguments of ``writer`` (its keyword-only parameters except ``overwrite``; the rest
    take their defaults); unknown names raise ``TypeError``. ``normalize(**all_params)`` returns the canonical,
    JSON-serialisable parameters (generator version included) whose hash names the sub-folder, so different
    parameters never share (or overwrite) a copy and equal ones always reuse it.
    """
    defaults = {
        name: p.default
        for name, p in inspect.signature(writer).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "overwrite"
    }
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"unknown synthetic dataset parameters: {sorted(unknown)}; known: {sorted(defaults)}")
    full = {**defaults, **params}
    key = json.dumps(normalize(**full), sort_keys=True)
    name = f"{prefix}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    return writer(Path(cache_dir).expanduser() / name, **full)
