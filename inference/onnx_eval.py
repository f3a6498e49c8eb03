"""``tools/eval.py onnx=PATH``: the COCO evaluation of an exported file (float32 or int8) through ONNX Runtime.

The data pipeline is checkpoint evaluation's: the dataset the file's stored config names (or the command line's),
its val split letterboxed by the same transform into the graph's input size, the same evaluator, the same
``metrics.json`` and ``predictions.json``. Only the network and its post-processing are the file's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from utils.files import atomic_path, atomic_write_json

from .onnx_model import OnnxPredictor

__all__ = ["evaluate_onnx"]

log = logging.getLogger(__name__)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def evaluate_onnx(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate ``cfg.onnx`` on the val split; writes metrics.json and predictions.json into ``run_dir``."""
    from hydra.utils import instantiate

    from tasks.checkpoint import merge_checkpoint_config
    from tasks.config_checks import ConfigError, check_run_config

    run_dir = Path(run_dir)
    torch.set_flush_denormal(True)
    predictor = OnnxPredictor(cfg.onnx)
    overrides = [o for o in overrides if not o.startswith("onnx=")]
    cfg = merge_checkpoint_config(cfg, predictor.config, overrides, mode="eval", source=cfg.onnx)
    asked = OmegaConf.select(cfg, "model.image_size")
    h, w = predictor.image_size
    graph_size = h if h == w else [h, w]
    if any(o.startswith("model.image_size=") for o in overrides) and asked not in (graph_size, [h, w]):
        raise ConfigError(f"{cfg.onnx}: the graph's input size is {[h, w]}; export at model.image_size={asked} to "
                          "evaluate at that size")
    OmegaConf.update(cfg, "model.image_size", graph_size, merge=False)
    if OmegaConf.select(cfg, "data.image_size") is not None:  # the data is letterboxed to what the graph takes
        OmegaConf.update(cfg, "data.image_size", graph_size, merge=False)
    check_run_config(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    evaluator = datamodule.make_evaluator()
    category_ids = np.asarray(datamodule.category_ids, dtype=np.int64)
    evaluator.reset()
    for batch in datamodule.val_dataloader():
        det = predictor.detections(batch["images"].numpy(), batch["scales"].numpy(), batch["orig_sizes"].numpy())
        labels = det["labels"].astype(np.int64)
        cats = np.where(labels >= 0, category_ids[np.clip(labels, 0, None)], -1)
        evaluator.update(
            image_ids=batch["image_ids"], boxes=torch.from_numpy(det["boxes"]).float(),
            scores=torch.from_numpy(det["scores"]).float(), category_ids=torch.from_numpy(cats),
            num_detections=torch.from_numpy(det["num_detections"].astype(np.int64)),
        )
    metrics = dict(evaluator.compute())
    metrics.setdefault("per_class", evaluator.per_class)
    print("\n" + evaluator.summary + "\n\n" + evaluator.per_class_table, flush=True)
    data = datamodule.describe(datamodule.val_split)
    log.info("evaluated %s images of split %s: %s%s data in %s", data["images"], data["split"], data["format"],
             " (generated)" if data["synthetic"] else "", data["root"])
    run_dir.mkdir(parents=True, exist_ok=True)
    model = {"onnx": str(cfg.onnx), "precision": predictor.precision, "image_size": [h, w]}
    atomic_write_json(run_dir / "metrics.json", _json_safe({**metrics, "data": data, "model": model}), indent=2)
    evaluator.write_predictions(run_dir / "predictions.json")
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("metrics: %s", json.dumps(_json_safe({k: v for k, v in metrics.items() if k != "per_class"})))
    return metrics
