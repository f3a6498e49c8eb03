"""Detections in the forms COCO evaluation uses: flat arrays per rank (:class:`EvalPayload`), merged across
ranks so each image counts once, and converted to the dicts of the COCO results format."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EvalPayload", "annotation_dicts", "concat_payloads", "merge_payloads", "result_dicts"]


@dataclass
class EvalPayload:
    """The detections one evaluator (one rank) holds, as flat arrays.

    ``image_ids[j]`` is the image id of the j-th image *occurrence* (every image passed to ``update``, in
    order, detections or not). Detection ``i`` belongs to occurrence ``occurrence[i]``; its box is
    ``boxes[i]`` = [x, y, w, h] in original image pixels.
    """

    image_ids: np.ndarray  # int64 [M]
    occurrence: np.ndarray  # int64 [N], index into image_ids
    boxes: np.ndarray  # float64 [N, 4] xywh
    scores: np.ndarray  # float64 [N]
    category_ids: np.ndarray  # int64 [N]

    @classmethod
    def empty(cls) -> EvalPayload:
        return cls(
            image_ids=np.zeros((0,), np.int64),
            occurrence=np.zeros((0,), np.int64),
            boxes=np.zeros((0, 4), np.float64),
            scores=np.zeros((0,), np.float64),
            category_ids=np.zeros((0,), np.int64),
        )

    @property
    def num_detections(self) -> int:
        return int(self.scores.shape[0])

    def detection_image_ids(self) -> np.ndarray:
        """Image id of every detection (int64 [N])."""
        return self.image_ids[self.occurrence]


def concat_payloads(payloads: Sequence[EvalPayload]) -> EvalPayload:
    """Concatenate payloads, shifting occurrence indices so they point into the joined image list."""
    if not payloads:
        return EvalPayload.empty()
    offsets = np.cumsum([0] + [p.image_ids.shape[0] for p in payloads[:-1]])
    return EvalPayload(
        image_ids=np.concatenate([p.image_ids for p in payloads]).astype(np.int64, copy=False),
        occurrence=np.concatenate([p.occurrence + off for p, off in zip(payloads, offsets)]).astype(np.int64),
        boxes=np.concatenate([p.boxes.reshape(-1, 4) for p in payloads]).astype(np.float64, copy=False),
        scores=np.concatenate([p.scores for p in payloads]).astype(np.float64, copy=False),
        category_ids=np.concatenate([p.category_ids for p in payloads]).astype(np.int64, copy=False),
    )


def merge_payloads(payloads: Sequence[EvalPayload]) -> EvalPayload:
    """Join the payloads of several ranks (in rank order) so that every image counts exactly once.

    A distributed sampler pads its shards by repeating images, so the same image id can reach the evaluator
    more than once. For each image id only the detections of its *first* occurrence (lowest rank, then
    earliest ``update`` on that rank) are kept. The result lists each image id once, sorted; merging is
    idempotent.
    """
    joined = concat_payloads(payloads)
    unique_ids, first = np.unique(joined.image_ids, return_index=True)
    owner = np.zeros(joined.image_ids.shape[0], dtype=bool)
    owner[first] = True
    keep = owner[joined.occurrence]
    kept_image_ids = joined.image_ids[joined.occurrence[keep]]
    return EvalPayload(
        image_ids=unique_ids.astype(np.int64, copy=False),
        occurrence=np.searchsorted(unique_ids, kept_image_ids).astype(np.int64),
        boxes=joined.boxes[keep],
        scores=joined.scores[keep],
        category_ids=joined.category_ids[keep],
    )


def result_dicts(payload: EvalPayload) -> list[dict[str, Any]]:
    """The detections in the COCO results format: image_id, category_id, bbox [x, y, w, h], score."""
    return [
        {"image_id": img, "category_id": cat, "bbox": box, "score": score}
        for img, cat, box, score in zip(
            payload.detection_image_ids().tolist(), payload.category_ids.tolist(), payload.boxes.tolist(),
            payload.scores.tolist(),
        )
    ]


def annotation_dicts(payload: EvalPayload) -> list[dict[str, Any]]:
    """The detections as COCO result annotations with the fields the evaluation reads (id, area, iscrowd)."""
    boxes = payload.boxes
    areas = (boxes[:, 2] * boxes[:, 3]).tolist()
    return [
        {"id": i + 1, "image_id": img, "category_id": cat, "bbox": box, "score": score,
         "area": area, "iscrowd": 0}
        for i, (img, cat, box, score, area) in enumerate(
            zip(payload.detection_image_ids().tolist(), payload.category_ids.tolist(), boxes.tolist(),
                payload.scores.tolist(), areas)
        )
    ]
