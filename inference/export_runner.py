"""``tools/export.py``: ONNX / TorchScript export of a checkpoint with a numerical check."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tasks.checkpoint import CheckpointError
from utils.files import atomic_write_json
from utils.sizes import image_hw, stride_error

from .export import ExportModule, check_onnx, check_torchscript, export_onnx, export_torchscript
from .onnx_model import write_metadata
from .predictor import Predictor

__all__ = ["export"]

log = logging.getLogger(__name__)


def _export_size(cfg: DictConfig, predictor: Predictor) -> tuple[int, int]:
    """``image_size`` (one side or ``[H, W]``), else the size the model predicts at by default."""
    from tasks.config_checks import ConfigError

    size = cfg.image_size
    if size is None:
        if predictor.kind == "detection":
            size = predictor.image_size
        else:
            data = predictor.config.get("data") or {}
            size = data.get("eval_size") or data.get("crop_size")
    if size is None:
        raise CheckpointError("the export size is unknown: set image_size=[H,W]")
    finest = predictor.kind == "detection"
    error = stride_error(size, predictor.input_stride, name="image_size",
                         why=f", the model's {'finest' if finest else 'coarsest'} stride")
    if error:
        raise ConfigError(error)
    return image_hw(size)


def _metadata(predictor: Predictor, module: ExportModule, size: tuple[int, int], *, precision: str) -> dict[str, Any]:
    """What prediction and evaluation with the exported file need (:func:`inference.onnx_model.read_metadata`)."""
    post = (predictor.config.get("task") or {}).get("module", {}).get("postprocess") if module.kind == "detection" else None
    return {
        "effdense_task": predictor.kind, "effdense_image_size": list(size), "effdense_class_names": predictor.class_names,
        "effdense_mean": module.mean.flatten().tolist(), "effdense_std": module.std.flatten().tolist(),
        "effdense_postprocess": {k: v for k, v in (post or {}).items() if not k.startswith("_")},
        "effdense_outputs": module.output_names, "effdense_precision": precision, "effdense_config": predictor.config,
    }


def _quantize(cfg: DictConfig, predictor: Predictor, module: ExportModule, size: tuple[int, int], onnx_path: Path,
              run_dir: Path) -> dict[str, Any]:
    """``model_int8.onnx`` next to ``onnx_path``: static INT8 quantization calibrated on real images."""
    from .calibration import calibration_batches
    from .quantize import compare_outputs, quantize_int8

    if cfg.quantize != "int8":
        from tasks.config_checks import ConfigError

        raise ConfigError(f"quantize must be int8 or null, got {cfg.quantize!r}")
    batches, used = calibration_batches(
        predictor.config, image_size=size, batch_size=int(cfg.batch_size), count=int(cfg.calib_images),
        split=str(cfg.calib_split), folder=cfg.get("calib_dir"), seed=int(cfg.get("seed", 0)),
    )
    path = run_dir / "model_int8.onnx"
    log.info("quantizing to int8, calibrated on %d images of %s", used["images"], used["source"])
    done = quantize_int8(onnx_path, path, batches, method=str(cfg.calib_method))
    write_metadata(path, _metadata(predictor, module, size, precision="int8"))
    return {
        "file": str(path), "bytes": path.stat().st_size,
        "size_ratio": round(path.stat().st_size / onnx_path.stat().st_size, 3),
        "calibration": {**used, "method": str(cfg.calib_method)},
        "quantized": {**done, "format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor",
                      "float32": "input normalisation, level flattening, anchors"
                                 + (", box decoding, clipping, scoring and NMS" if module.kind == "detection"
                                    else ", upsampling and argmax")},
        "difference_vs_float32": compare_outputs(onnx_path, path, batches, kind=module.kind),
    }


def export(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    from tasks.config_checks import check_export_config

    check_export_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)
    overrides = list(OmegaConf.to_container(cfg.config_overrides, resolve=True) or [])
    predictor = Predictor.from_checkpoint(cfg.ckpt, device="cpu", overrides=overrides)
    size = _export_size(cfg, predictor)
    module = ExportModule(predictor.task, postprocess=cfg.postprocess).eval()
    report: dict[str, Any] = {
        "ckpt": str(cfg.ckpt), "task": predictor.kind, "image_size": list(size), "batch_size": int(cfg.batch_size),
        "dynamic_batch": bool(cfg.dynamic_batch),
        "postprocess": bool(cfg.postprocess) and predictor.kind == "detection",
        "inputs": "images: float [B, 3, H, W] RGB 0..255", "outputs": module.output_names,
    }
    onnx_path = export_onnx(module, run_dir / "model.onnx", image_size=size, batch_size=cfg.batch_size,
                            dynamic_batch=cfg.dynamic_batch, opset=cfg.opset)
    write_metadata(onnx_path, _metadata(predictor, module, size, precision="float32"))
    report["onnx"] = {"file": str(onnx_path), "bytes": onnx_path.stat().st_size}
    if cfg.check:
        report["onnx"]["check"] = check_onnx(module, onnx_path, image_size=size, batch_size=cfg.batch_size)
        if cfg.dynamic_batch:
            other = cfg.batch_size + 1
            report["onnx"][f"check_batch_{other}"] = check_onnx(module, onnx_path, image_size=size, batch_size=other)
    if cfg.get("quantize"):
        report["onnx_int8"] = _quantize(cfg, predictor, module, size, onnx_path, run_dir)
    if cfg.torchscript:
        try:
            ts_path = export_torchscript(module, run_dir / "model.pt", image_size=size, batch_size=cfg.batch_size)
            report["torchscript"] = {"file": str(ts_path)}
            if cfg.check:
                report["torchscript"]["check"] = check_torchscript(module, ts_path, image_size=size,
                                                                   batch_size=cfg.batch_size)
        except Exception as err:  # noqa: BLE001 - TorchScript is best effort; the report says why it failed
            report["torchscript"] = {"error": f"{type(err).__name__}: {err}"}
            log.warning("TorchScript export failed: %s", err)
    atomic_write_json(run_dir / "export.json", report, indent=2)
    print(json.dumps(report, indent=2), flush=True)
    return report
