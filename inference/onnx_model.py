"""Prediction with an exported ONNX file through ONNX Runtime, with no checkpoint beside it.

``tools/export.py`` writes what prediction and evaluation need into the file's ``metadata_props``
(:func:`write_metadata`): the task, the input size, the class names, the normalisation (applied inside the graph)
and the whole stored run config. :class:`OnnxPredictor` letterboxes images as :class:`inference.Predictor` does,
runs the graph (float32 or int8) and returns the same result dicts, boxes in original image pixels.

An exported detection graph clips boxes to its whole input before NMS; here they are clipped again to the part of
the input that holds the image (the letterbox padding excluded) and scaled back, as checkpoint prediction does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.checkpoint import CheckpointError

__all__ = ["METADATA_KEYS", "OnnxPredictor", "check_model_source", "read_metadata", "write_metadata"]

#: The ``metadata_props`` keys an exported file carries (values are JSON text).
METADATA_KEYS = ("effdense_task", "effdense_image_size", "effdense_class_names", "effdense_mean", "effdense_std",
                 "effdense_postprocess", "effdense_outputs", "effdense_precision", "effdense_config")


def check_model_source(cfg) -> str:
    """``ckpt`` or ``onnx``, exactly one (a one-line :class:`ConfigError` otherwise); returns which."""
    from tasks.config_checks import ConfigError

    ckpt, onnx = cfg.get("ckpt"), cfg.get("onnx")
    if ckpt and onnx:
        raise ConfigError(f"give ckpt=... or onnx=..., not both (ckpt={ckpt}, onnx={onnx})")
    if not ckpt and not onnx:
        raise ConfigError("give the model to run: ckpt=PATH (a checkpoint) or onnx=PATH (an exported model.onnx)")
    return "onnx" if onnx else "ckpt"


def write_metadata(path: str | os.PathLike, values: dict[str, Any]) -> None:
    """Store ``values`` (each as JSON text) in the ONNX file's ``metadata_props``, replacing keys already there."""
    import onnx

    from utils.files import atomic_path

    path = Path(path)
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The effdense metadata of an exported ONNX file; one-line errors for a missing file, a file that is not ONNX
    and an ONNX file that was not written by ``tools/export.py``."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises several types for a file of another kind
        raise CheckpointError(f"{path}: not an ONNX model ({type(err).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in METADATA_KEYS if k not in props]
    if not model.graph.node or missing:
        raise CheckpointError(f"{path}: an ONNX model without effdense metadata ({', '.join(missing) or 'no graph'}); "
                              "export it with tools/export.py")
    try:
        return {k.removeprefix("effdense_"): json.loads(props[k]) for k in METADATA_KEYS}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: malformed effdense metadata ({err})") from None


class OnnxPredictor:
    """An exported detection file in ONNX Runtime plus the letterbox pre-processing it was exported for.

    Args:
        path: an ONNX file written by ``tools/export.py`` (float32 ``model.onnx`` or int8 ``model_int8.onnx``)
            with the post-processing in the graph.
        threads: ONNX Runtime intra-op threads (0: its default).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 0) -> None:
        import onnxruntime as ort

        from datasets import build_eval_transform

        self.path = Path(path)
        meta = read_metadata(self.path)
        self.metadata = meta
        self.kind = meta["task"]
        if self.kind != "detection":
            raise CheckpointError(f"{self.path}: a {self.kind} model; evaluating and predicting with an exported file "
                                  "is implemented for detection (use ckpt=... for segmentation)")
        if meta["outputs"] != ["boxes", "scores", "labels", "num_detections"]:
            raise CheckpointError(f"{self.path}: exported without post-processing (outputs {meta['outputs']}); "
                                  "export with postprocess=true to evaluate or predict with it")
        self.config: dict[str, Any] = meta["config"]
        self.class_names: list[str] = list(meta["class_names"])
        self.image_size: tuple[int, int] = tuple(int(s) for s in meta["image_size"])
        self.precision: str = meta["precision"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        batch = self.session.get_inputs()[0].shape[0]
        #: The batch the graph takes (``None``: any, exported with ``dynamic_batch``).
        self.batch_size: int | None = batch if isinstance(batch, int) else None
        self.transform = build_eval_transform(image_size=self.image_size)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Letterboxed uint8 or float images ``[B, 3, H, W]`` -> the graph's outputs (boxes in input pixels), run
        in chunks of the graph's batch size."""
        step = self.batch_size or len(images)
        outs: list[list[np.ndarray]] = []
        for start in range(0, len(images), step):
            chunk = np.ascontiguousarray(images[start : start + step], dtype=np.float32)
            short = step - len(chunk)  # a graph of fixed batch: the last chunk is padded with its last image
            if short:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)])
            outs.append([o[: step - short] for o in self.session.run(None, {"images": chunk})])
        names = ("boxes", "scores", "labels", "num_detections")
        return {n: np.concatenate([o[i] for o in outs]) for i, n in enumerate(names)}

    def detections(self, images: np.ndarray, scales: np.ndarray, orig_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """As :meth:`run`, with boxes clipped to each image's part of the letterboxed input and mapped back to
        original pixels (``scales``: [B] letterbox scale, ``orig_sizes``: [B, 2] original H, W)."""
        out = self.run(images)
        scales = np.asarray(scales, np.float32).reshape(-1, 1, 1)
        valid = np.asarray(orig_sizes, np.float32).reshape(-1, 2) * scales.reshape(-1, 1)
        boxes = out["boxes"].astype(np.float32)
        upper = np.stack([valid[:, 1], valid[:, 0], valid[:, 1], valid[:, 0]], axis=1)[:, None, :]
        out["boxes"] = np.clip(boxes, 0.0, upper) / scales
        return out

    def predict_arrays(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """HxWx3 uint8 RGB arrays -> one result dict per image, as :meth:`inference.Predictor.predict_arrays`."""
        if not images:
            return []
        empty_boxes, empty_labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        outs = [self.transform(im, empty_boxes, empty_labels) for im in images]
        batch = np.stack([o["image"].transpose(2, 0, 1) for o in outs])
        det = self.detections(batch, np.array([o["scale"] for o in outs]), np.array([im.shape[:2] for im in images]))
        results = []
        for b in range(len(images)):
            n = int(det["num_detections"][b])
            labels = [int(k) for k in det["labels"][b, :n]]
            results.append({
                "boxes": det["boxes"][b, :n].tolist(), "scores": det["scores"][b, :n].tolist(), "labels": labels,
                "names": [self.class_names[k] for k in labels],
            })
        return results

    def __call__(self, inputs: str | os.PathLike | np.ndarray | Sequence, *, batch_size: int = 4) -> list[dict]:
        """Predict on image paths or HxWx3 uint8 RGB arrays (see :meth:`inference.Predictor.__call__`)."""
        from .predictor import read_rgb

        items = [inputs] if isinstance(inputs, (str, os.PathLike, np.ndarray)) else list(inputs)
        results: list[dict[str, Any]] = []
        for start in range(0, len(items), batch_size):
            chunk = [read_rgb(i) if isinstance(i, (str, os.PathLike)) else np.asarray(i)
                     for i in items[start : start + batch_size]]
            results.extend(self.predict_arrays(chunk))
        return results
