"""What a benchmark run reports: the environment line, the device's name, the table and the JSON lines file."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

import torch

from utils.files import atomic_path

__all__ = ["device_name", "environment", "format_table", "size_text", "write_rows"]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment() -> dict[str, Any]:
    """The versions a result depends on (torch, torchvision, timm, Python; effdet and CUDA when present)."""
    import timm
    import torchvision

    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
           "python": platform.python_version()}
    try:
        env["effdet"] = importlib.metadata.version("effdet")
    except importlib.metadata.PackageNotFoundError:
        pass
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
    return env


def format_table(rows: list[dict]) -> str:
    """A readable table of the rows (one line per measurement and implementation)."""
    header = ["measure", "impl", "batch", "value", "unit", "ratio", "peak MB", "input"]
    lines = [header]
    for r in rows:
        if r["measure"] == "data":
            lines.append(["data", f"{r['workers']} workers", str(r["batch"]), f"{r['value']:,.1f}",
                          f"images/s ({r['per_worker']:,.1f} per worker)", "", "", size_text(r.get("image_size"))])
            continue
        if r["measure"] == "agreement":
            value = (f"logits {r['max_class_logit_diff']:.1e}, scores {r['max_sorted_score_diff']:.1e}, "
                     f"matched {r['detections_matched']:.3f}")
            lines.append([r["measure"], f"{r['impl']} vs {r['model']}", "", value, "", "", "", ""])
            continue
        if r["measure"] == "ops":
            value = (f"train {r['value']:,} ({r['train_host_syncs']} syncs, {r.get('train_views', 0):,} views), "
                     f"predict {r['predict_operations']:,} "
                     f"({r['predict_host_syncs']} syncs, batch {r['predict_batch']})")
            sizes = f"train {size_text(r['image_size'])}, predict {size_text(r['predict_image_size'])}"
            lines.append(["ops", r["impl"], str(r["batch"]), value, "operations", "" if r.get("ratio") is None
                          else f"{r['ratio']:.3f}", "", sizes])
            continue
        value = r["value"]
        value = f"{value:,}" if isinstance(value, int) else f"{value:,.2f}" if value >= 10 else f"{value:.3f}"
        ratio = r.get("ratio")
        lines.append([r["measure"], r["impl"], str(r.get("batch", "")), value, r["unit"],
                      "" if ratio is None else f"{ratio:.3f}",
                      "" if r.get("peak_memory_mb") is None else f"{r['peak_memory_mb']:,.0f}",
                      "" if r["measure"] == "params" else size_text(r.get("image_size"))])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def size_text(size) -> str:
    """``[H, W]`` (or a side) as ``HxW``; empty when unknown."""
    if size is None:
        return ""
    h, w = (size, size) if isinstance(size, int) else size
    return f"{h}x{w}"


def write_rows(rows: list[dict], path: str | Path) -> None:
    """Write ``rows`` as JSON lines to ``path``, whole or not at all (through a temporary file)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows))
