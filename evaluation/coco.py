"""COCO bounding-box evaluation: accumulate detections, gather them across ranks, report the 12 COCO numbers and
AP / AP50 per category.

Detections are kept as compact numpy arrays while a validation epoch runs (:mod:`evaluation.coco_results`);
per-detection dicts are only built when the evaluation (or the results file) needs them. The numbers are those of
the COCO evaluation (pycocotools ``COCOeval``, or the compatible ``faster_coco_eval`` implementation), including
``-1.0`` where the evaluation has no ground truth to measure against; per category that case is ``None``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.files import atomic_write_json

from .coco_results import EvalPayload, annotation_dicts, concat_payloads, merge_payloads, result_dicts
from .per_class import format_per_class_table

__all__ = [
    "BACKENDS",
    "METRIC_NAMES",
    "PER_CLASS_COLUMNS",
    "CocoEvaluator",
    "load_coco",
]

log = logging.getLogger(__name__)

#: The 12 numbers of the standard COCO bbox summary, in ``COCOeval.stats`` order.
METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
BACKENDS: tuple[str, ...] = ("pycocotools", "faster_coco_eval")
#: The per-category values (:attr:`CocoEvaluator.per_class`) as columns of the printed table.
PER_CLASS_COLUMNS = (("AP", "AP (%)", "percent"), ("AP50", "AP50 (%)", "percent"), ("num_gt", "GT boxes", "count"))


def load_coco(source: COCO | str | os.PathLike) -> COCO:
    """A pycocotools ``COCO`` ground-truth object from an existing one or from an instances JSON file (read
    and validated by :func:`datasets.load_coco_annotations`, so a bad file is a ``DatasetError`` naming it)."""
    if isinstance(source, COCO):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a pycocotools COCO object or a path to a COCO JSON file, got {type(source)!r}")
    from datasets.coco_annotations import load_coco_annotations

    return load_coco_annotations(source)


def _to_numpy(x: Any, dtype: np.dtype, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach()
        torch_dtype = torch.float64 if np.dtype(dtype).kind == "f" else torch.int64
        return t.to(device="cpu", dtype=torch_dtype).numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: cannot convert {type(x)!r} to an array of {np.dtype(dtype)}") from e


# ---------------------------------------------------------------------------------------------- evaluator
class CocoEvaluator:
    """Accumulates detections over an evaluation epoch and computes the 12 COCO bbox metrics.

    Typical use::

        ev = CocoEvaluator(coco_gt)            # pycocotools COCO, or a path to instances_*.json
        for batch in loader:
            ev.update(image_ids=..., boxes=..., scores=..., category_ids=..., num_detections=...)
        metrics = ev.compute()                 # {"AP": ..., "AP50": ..., ..., "ARl": ...}
        print(ev.summary)                      # the standard 12-line summary
        print(ev.per_class_table)              # AP, AP50 and ground-truth boxes per category
        ev.per_class                           # {"person": {"AP": ..., "AP50": ..., "num_gt": ...}, ...}
        ev.write_predictions("predictions.json")

    Args:
        coco_gt: the ground truth, as a pycocotools ``COCO`` object or a COCO instances JSON path.
        backend: "pycocotools" (default) or "faster_coco_eval" (another implementation, the same numbers).
    """

    def __init__(self, coco_gt: COCO | str | os.PathLike, *, backend: str = "pycocotools") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown COCO evaluation backend {backend!r}; expected one of {BACKENDS}")
        if backend == "faster_coco_eval":
            _import_faster_coco_eval()
        self.coco_gt = load_coco(coco_gt)
        self.backend = backend
        self._gt_image_ids = np.asarray(sorted(self.coco_gt.getImgIds()), dtype=np.int64)
        self._gt_category_ids = np.asarray(sorted(self.coco_gt.getCatIds()), dtype=np.int64)
        self._faster_gt = None  # the ground truth as a faster_coco_eval COCO, built on first use
        self.category_names = _category_names(self.coco_gt, self._gt_category_ids.tolist())
        self.summary: str = ""
        self.reset()

    # ------------------------------------------------------------------ accumulation
    def reset(self) -> None:
        """Forget every detection and image seen so far."""
        self._chunks: list[EvalPayload] = []
        self.summary = ""
        #: Set by :meth:`compute`, per category of the ground truth (category id order, keyed by its name):
        #: ``{"AP": float | None, "AP50": float | None, "num_gt": int}``. Each AP is what the COCO evaluation gives
        #: for that category alone (``params.catIds = [id]``); ``None`` where the evaluated images hold no
        #: non-crowd box of it (COCO's -1). ``num_gt``: its non-crowd ground-truth boxes in the evaluated images.
        self.per_class: dict[str, dict[str, Any]] = {}
        #: :attr:`per_class` as a printable table, with the mean (the COCO AP and AP50) below; set by :meth:`compute`.
        self.per_class_table: str = ""

    def update(
        self,
        *,
        image_ids: Sequence[int] | torch.Tensor,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        category_ids: torch.Tensor,
        num_detections: torch.Tensor | None = None,
    ) -> None:
        """Add one batch of detections.

        Args:
            image_ids: [B] dataset image ids; every one is recorded as evaluated, even with no detections.
            boxes: [B, D, 4] boxes (x1, y1, x2, y2) in original image pixels.
            scores: [B, D] confidences.
            category_ids: [B, D] dataset category ids; rows with a negative id are padding.
            num_detections: [B] number of valid rows per image; later rows are padding. ``None``: all rows.
        """
        ids = _to_numpy(image_ids, np.int64, "image_ids").reshape(-1)
        b = ids.shape[0]
        bx = _to_numpy(boxes, np.float64, "boxes")
        sc = _to_numpy(scores, np.float64, "scores")
        cats = _to_numpy(category_ids, np.int64, "category_ids")
        if bx.ndim != 3 or bx.shape[0] != b or bx.shape[2] != 4:
            raise ValueError(f"boxes must have shape [B={b}, D, 4], got {tuple(bx.shape)}")
        d = bx.shape[1]
        if sc.shape != (b, d):
            raise ValueError(f"scores must have shape [B, D] = {(b, d)}, got {tuple(sc.shape)}")
        if cats.shape != (b, d):
            raise ValueError(f"category_ids must have shape [B, D] = {(b, d)}, got {tuple(cats.shape)}")
        unknown = np.setdiff1d(ids, self._gt_image_ids)
        if unknown.size:
            raise ValueError(f"image ids not in the ground truth: {unknown[:10].tolist()}")

        valid = cats >= 0
        if num_detections is not None:
            nd = _to_numpy(num_detections, np.int64, "num_detections").reshape(-1)
            if nd.shape[0] != b:
                raise ValueError(f"num_detections must have shape [B={b}], got {tuple(nd.shape)}")
            valid &= np.arange(d)[None, :] < nd[:, None]
        rows, cols = np.nonzero(valid)
        sel_boxes = bx[rows, cols]
        sel_scores = sc[rows, cols]
        sel_cats = cats[rows, cols]
        if not (np.isfinite(sel_boxes).all() and np.isfinite(sel_scores).all()):
            raise ValueError("detections contain non-finite boxes or scores")
        bad_cats = np.setdiff1d(sel_cats, self._gt_category_ids)
        if bad_cats.size:
            raise ValueError(f"category ids not in the ground truth: {bad_cats[:10].tolist()}")

        xywh = np.empty_like(sel_boxes)
        xywh[:, :2] = sel_boxes[:, :2]
        xywh[:, 2:] = sel_boxes[:, 2:] - sel_boxes[:, :2]
        self._chunks.append(
            EvalPayload(
                image_ids=ids.copy(),
                occurrence=rows.astype(np.int64),
                boxes=xywh,
                scores=sel_scores,
                category_ids=sel_cats,
            )
        )

    def payload(self) -> EvalPayload:
        """Everything this evaluator holds, as one payload (before de-duplication)."""
        if len(self._chunks) != 1:
            self._chunks = [concat_payloads(self._chunks)]
        return self._chunks[0]

    def load_payload(self, payload: EvalPayload) -> None:
        """Replace the held detections by ``payload`` (e.g. the merged payload of all ranks)."""
        self._chunks = [payload]

    def gather(self) -> None:
        """Collect every rank's detections (when running distributed) and count each image once.

        With an initialized process group of world size > 1 this is a collective call: every rank must call
        it, and afterwards every rank holds the same merged detections. Otherwise only de-duplicates images
        updated more than once.
        """
        local = self.payload()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                gathered: list[Any] = [None] * world
                torch.distributed.all_gather_object(gathered, local)
                self.load_payload(merge_payloads(gathered))
                return
        self.load_payload(merge_payloads([local]))

    # ------------------------------------------------------------------ evaluation
    @property
    def image_ids(self) -> list[int]:
        """Sorted ids of the images seen so far (on this rank, or all ranks after :meth:`gather`)."""
        return np.unique(self.payload().image_ids).tolist()

    def compute(self) -> dict[str, float]:
        """Gather, evaluate the images seen, and return the 12 COCO numbers; sets :attr:`summary`,
        :attr:`per_class` and :attr:`per_class_table`."""
        self.gather()
        payload = self.payload()
        if payload.image_ids.size == 0:
            raise RuntimeError("CocoEvaluator.compute() called before any update(): no images to evaluate")
        dt_dataset = {
            "info": dict(self.coco_gt.dataset.get("info", {})),
            "images": list(self.coco_gt.dataset["images"]),
            "categories": [dict(c) for c in self.coco_gt.dataset["categories"]],
            "annotations": annotation_dicts(payload),
        }
        img_ids = payload.image_ids.tolist()  # unique and sorted after gather()
        if not any(not a.get("iscrowd", 0) for i in img_ids for a in self.coco_gt.imgToAnns.get(i, ())):
            log.warning("the %d evaluated images have no annotations (no ground truth): every COCO metric is -1, "
                        "COCO's 'undefined'", len(img_ids))
        if self.backend == "pycocotools":
            stats, summary, ev = self._eval_pycocotools(dt_dataset, img_ids)
        else:
            stats, summary, ev = self._eval_faster(dt_dataset, img_ids)
        self.summary = summary
        metrics = {name: float(v) for name, v in zip(METRIC_NAMES, stats[: len(METRIC_NAMES)])}
        self.per_class = self._per_class(ev, img_ids)
        total = sum(v["num_gt"] for v in self.per_class.values())
        mean = {k: (None if metrics[k] == -1.0 else metrics[k]) for k in ("AP", "AP50")}
        self.per_class_table = format_per_class_table(self.per_class, PER_CLASS_COLUMNS,
                                                      [("mean (AP, AP50)", {**mean, "num_gt": total})])
        return metrics

    def _per_class(self, ev: Any, img_ids: list[int]) -> dict[str, dict[str, Any]]:
        """AP and AP50 per category from an accumulated evaluation: the all-areas, 100-detections precision of that
        category, averaged over the values the evaluation defines (the same mean ``summarize`` takes)."""
        params = ev.params
        precision = np.asarray(ev.eval["precision"])  # [IoU thresholds, recall thresholds, categories, areas, maxDets]
        area = list(params.areaRngLbl).index("all")
        at50 = int(np.flatnonzero(np.isclose(np.asarray(params.iouThrs), 0.5))[0])
        counts = Counter(a["category_id"] for i in img_ids for a in self.coco_gt.imgToAnns.get(i, ())
                         if not a.get("iscrowd", 0))

        def mean(p: np.ndarray) -> float | None:
            p = p[p > -1]
            return float(np.mean(p)) if p.size else None

        out = {}
        for k, cat in enumerate(int(c) for c in params.catIds):
            p = precision[:, :, k, area, -1]
            out[self.category_names[cat]] = {"AP": mean(p), "AP50": mean(p[at50 : at50 + 1]), "num_gt": counts[cat]}
        return out

    def _eval_pycocotools(self, dt_dataset: dict, img_ids: list[int]) -> tuple[np.ndarray, str, COCOeval]:
        from datasets.coco_annotations import make_coco

        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            coco_dt = make_coco(dt_dataset)
            ev = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            ev.params.imgIds = img_ids
            ev.evaluate()
            ev.accumulate()
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            ev.summarize()
        return np.asarray(ev.stats, dtype=np.float64), text.getvalue().rstrip("\n"), ev

    def _eval_faster(self, dt_dataset: dict, img_ids: list[int]) -> tuple[np.ndarray, str, Any]:
        fce = _import_faster_coco_eval()

        def quiet(*args: Any, **kwargs: Any) -> None:
            return None

        if self._faster_gt is None:
            self._faster_gt = fce.COCO(self.coco_gt.dataset, print_function=quiet)
        coco_dt = fce.COCO(dt_dataset, print_function=quiet)
        ev = fce.COCOeval_faster(self._faster_gt, coco_dt, iouType="bbox", print_function=quiet)
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        lines: list[str] = []
        ev.print_function = lambda *args, **kwargs: lines.append(" ".join(str(a) for a in args))
        ev.summarize()
        # This backend adds AR@0.5 and AR@0.75 after the standard 12 lines.
        return np.asarray(ev.stats, dtype=np.float64), "\n".join(lines[: len(METRIC_NAMES)]), ev

    # ------------------------------------------------------------------ outputs
    def results(self) -> list[dict[str, Any]]:
        """The detections in the COCO results format: image_id, category_id, bbox [x, y, w, h], score.

        Images updated more than once count once; after :meth:`compute` in a distributed run this is every
        rank's detections.
        """
        return result_dicts(merge_payloads([self.payload()]))

    def write_predictions(self, path: str | os.PathLike) -> Path:
        """Write :meth:`results` as a COCO results JSON file, atomically."""
        return atomic_write_json(path, self.results())

    @staticmethod
    def write_metrics(path: str | os.PathLike, metrics: dict[str, Any]) -> Path:
        """Write a metrics dict as JSON, atomically: numbers as floats, nested dicts (e.g. ``per_class``) kept,
        ``None`` as ``null``."""
        return atomic_write_json(path, _plain(metrics), indent=2)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(value)


def _category_names(coco: COCO, cat_ids: list[int]) -> dict[int, str]:
    """Category id -> its name in the ground truth; a name that two categories share gets ``" (id N)"`` added."""
    names = [str(coco.cats[c].get("name") or c) for c in cat_ids]
    shared = {n for n, count in Counter(names).items() if count > 1}
    return {c: f"{n} (id {c})" if n in shared else n for c, n in zip(cat_ids, names)}


def _import_faster_coco_eval():
    try:
        import faster_coco_eval
    except ImportError as e:
        raise ImportError(
            "COCO evaluation backend 'faster_coco_eval' needs the faster-coco-eval package "
            "(pip install faster-coco-eval), or use backend='pycocotools'"
        ) from e
    return faster_coco_eval

