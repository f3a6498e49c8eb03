"""The per-class results of an evaluation, printed as one table layout for detection and segmentation.

Both tasks report ``per_class: {class name: {metric: value}}`` (metrics.json, :attr:`DenseTask.last_metrics`); a
metric a class has nothing to measure for (no ground truth) is ``None`` (``null`` in JSON, ``n/a`` in the table).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Column", "format_per_class_table", "undefined"]

#: ``(metric key, column header, kind)``: kind ``"percent"`` prints a 0..1 value as a percentage with two decimals,
#: ``"count"`` an integer.
Column = tuple[str, str, str]


def undefined(value: Any) -> bool:
    """Whether ``value`` stands for "nothing to measure": ``None`` or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(value: Any, kind: str) -> str:
    if undefined(value):
        return "n/a"
    if kind == "percent":
        return f"{100 * float(value):.2f}"
    if kind == "count":
        return str(int(value))
    raise ValueError(f"unknown column kind {kind!r}; expected 'percent' or 'count'")


def format_per_class_table(
    per_class: Mapping[str, Mapping[str, Any]],
    columns: Sequence[Column],
    footer: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> str:
    """A text table: one row per class (in ``per_class`` order), one column per ``columns`` entry, then the
    ``footer`` rows (label, values; a key a footer row lacks leaves its cell empty) under a rule."""
    rows = [(name, [_cell(values.get(key), kind) for key, _, kind in columns]) for name, values in per_class.items()]
    tail = [(label, ["" if key not in values else _cell(values[key], kind) for key, _, kind in columns])
            for label, values in footer]
    labels = [name for name, _ in rows + tail]
    width = max([len("class"), *map(len, labels)])
    widths = [max([len(header), *(len(cells[i]) for _, cells in rows + tail)]) for i, (_, header, _) in
              enumerate(columns)]

    def line(label: str, cells: Sequence[str]) -> str:
        return "  ".join([f"{label:<{width}}", *(f"{c:>{w}}" for c, w in zip(cells, widths))]).rstrip()

    rule = "-" * (width + sum(w + 2 for w in widths))
    out = [line("class", [header for _, header, _ in columns]), rule, *(line(n, c) for n, c in rows)]
    if tail:
        out += [rule, *(line(n, c) for n, c in tail)]
    return "\n".join(out)
