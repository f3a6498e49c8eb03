"""COCO-format detection dataset and the batch collate function. The annotation file is read and checked by
:mod:`datasets.coco_annotations`."""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ._imageio import decode_image, read_file
from ._seeding import sample_key_split
from ._skip import first_readable, skip_summary
from .coco_annotations import load_checked, make_coco
from .errors import DatasetError, DatasetNotFoundError

__all__ = ["LABEL_MODES", "CocoDetection", "collate_detection"]

log = logging.getLogger(__name__)

#: "contiguous": label k is the k-th category in id order (num_classes = number of categories);
#: "category_id": label = category id - 1 (COCO's 90-class label space, as the published EfficientDet models).
LABEL_MODES = ("contiguous", "category_id")

_IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # COCO boxes refer to the stored pixels


class CocoDetection(Dataset):
    """Images and boxes of a COCO instances file (any folder in the COCO layout).

    Args:
        image_dir: folder holding the images (``file_name`` is relative to it).
        ann_file: COCO instances JSON.
        annotations: instead of ``ann_file``, the annotations as a COCO-format dict already read and checked
            (images with positive integer ids and sizes, annotations with unique positive ids, ``iscrowd`` and
            ``area``), e.g. built from another format by :func:`datasets.load_voc` or :func:`datasets.load_yolo`.
            Its image entries may name ``annotation_file``, the file that gave their size (for error messages).
        source: what error messages and warnings name as the annotations' origin (default: ``ann_file``).
        transform: ``(image HxWx3 uint8 RGB, boxes [N, 4] xyxy, labels [N] int64) -> dict(image, boxes,
            labels, scale)``, e.g. :func:`datasets.build_train_transform` / :func:`datasets.build_eval_transform`.
        min_box_size: non-crowd boxes narrower or shorter than this (in original pixels, after clipping to
            the image) are dropped and counted in ``num_degenerate``.
        label_mode: ``"contiguous"`` (label k is ``cat_ids[k]``, the k-th category in id order) or
            ``"category_id"`` (label = category id - 1; ``cat_ids`` is ``1..num_classes``).
        num_classes: size of the label space for ``label_mode="category_id"`` (default: the largest id).
        skip_bad: skip bad input instead of raising :class:`DatasetError`. Bad annotations (see
            :func:`datasets.load_coco_annotations`) and images whose file is missing are dropped when the dataset
            is built, and one warning counts them by reason; an image found corrupt, truncated or of the wrong size
            when it is read is replaced by the next readable image (index order) and named in a warning.

    Crowd annotations stay in ``coco`` (evaluation uses them) but are not training targets. Images without
    objects are kept and train as pure background. Targets are precomputed into flat arrays at construction,
    so ``__getitem__`` does no JSON work and touches no per-annotation Python objects.

    Each sample is a dict: ``image`` uint8 ``[3, S, S]`` (contiguous CHW), ``boxes`` float32 ``[N, 4]`` xyxy
    in output pixels, ``labels`` int64 ``[N]``, ``image_id`` int, ``scale`` float (output pixels per original
    pixel), ``orig_size`` ``(h, w)``.
    """

    def __init__(
        self,
        *,
        image_dir: str | Path,
        ann_file: str | Path | None = None,
        annotations: dict | None = None,
        source: str | None = None,
        transform: Callable,
        min_box_size: float = 1.0,
        label_mode: str = "contiguous",
        num_classes: int | None = None,
        skip_bad: bool = False,
    ) -> None:
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if (ann_file is None) == (annotations is None):
            raise ValueError("CocoDetection needs exactly one of ann_file and annotations")
        self.image_dir = Path(image_dir).expanduser()
        self.ann_file = Path(ann_file).expanduser() if ann_file is not None else None
        self._annotations = annotations  # given in memory: kept, as nothing could read them again
        self.source = source if source is not None else str(self.ann_file)
        if not self.image_dir.is_dir():
            raise DatasetNotFoundError(f"image folder not found: {self.image_dir}")
        self.skip_bad = bool(skip_bad)
        self._bad: dict[int, str] = {}  # index -> why it cannot be read (skip_bad; per process)
        data, ann_skips, image_skips = self._load(check_folder=True)
        self.skipped: dict[str, Counter] = {"annotations": ann_skips, "images": image_skips}
        summary = skip_summary(self.source, annotation=ann_skips, image=image_skips)
        if summary:
            log.warning("%s", summary)
        if not data["images"]:
            raise DatasetError(
                f"{self.source}: no image left to use"
                + (f" ({summary})" if summary else " (its 'images' list is empty)")
            )
        self._coco: COCO | None = make_coco(data)
        self.transform = transform
        self.label_mode = label_mode
        self.min_box_size = float(min_box_size)

        cats = sorted(data["categories"], key=lambda c: c["id"])
        if label_mode == "contiguous":
            self.cat_ids = [c["id"] for c in cats]
            self.class_names = [str(c["name"]) for c in cats]
            label_of = {cid: k for k, cid in enumerate(self.cat_ids)}
        else:
            size = int(num_classes) if num_classes is not None else cats[-1]["id"]
            if cats[0]["id"] < 1 or cats[-1]["id"] > size:
                raise DatasetError(
                    f"{self.source}: category ids must lie in 1..{size} for label_mode=category_id, "
                    f"found {cats[0]['id']}..{cats[-1]['id']}"
                )
            names = {c["id"]: str(c["name"]) for c in cats}
            self.cat_ids = list(range(1, size + 1))
            self.class_names = [names.get(i, f"unused_{i}") for i in self.cat_ids]
            label_of = {cid: cid - 1 for cid in names}
        self.num_classes = len(self.cat_ids)

        # Per-image data as flat arrays (cheap to share with forked loader workers).
        images = sorted(data["images"], key=lambda im: im["id"])
        self.image_ids: list[int] = [int(im["id"]) for im in images]
        self._file_names = np.asarray([str(im["file_name"]) for im in images], dtype=np.str_)
        self._sizes = np.asarray([(im["height"], im["width"]) for im in images], dtype=np.int64).reshape(-1, 2)
        self._size_files = (  # where each image's size comes from, when not the annotation file
            np.asarray([str(im.get("annotation_file", "")) for im in images], dtype=np.str_)
            if any("annotation_file" in im for im in images) else None
        )
        self._boxes, self._labels, self._offsets = self._build_targets(data["annotations"], label_of)

    def _load(self, *, check_folder: bool) -> tuple[dict, Counter, Counter]:
        """The validated annotations; with ``skip_bad`` without the bad entries and the images whose file is
        missing. ``check_folder``: an empty image folder is an error (the data is not where the config says)."""
        if self._annotations is not None:
            data, ann_skips, image_skips = self._annotations, Counter(), Counter()
        else:
            data, ann_skips, image_skips = load_checked(self.ann_file, skip_bad=self.skip_bad)
        images = data["images"]
        if check_folder and images:
            with os.scandir(self.image_dir) as entries:
                if next(entries, None) is None:
                    raise DatasetNotFoundError(
                        f"{self.image_dir}: the image folder is empty, but {self._source_name} lists "
                        f"{len(images)} image(s) in it"
                    )
        if self.skip_bad and images:
            with os.scandir(self.image_dir) as entries:  # one listing instead of a stat per image
                names = {e.name for e in entries if not e.is_dir()}

            def exists(file_name: str) -> bool:
                if "/" in file_name or os.sep in file_name:  # in a sub-folder
                    return (self.image_dir / file_name).is_file()
                return file_name in names

            present = [img for img in images if exists(str(img["file_name"]))]
            if len(present) < len(images):
                image_skips["missing file"] += len(images) - len(present)
                kept_ids = {img["id"] for img in present}
                data = {
                    **data,
                    "images": present,
                    "annotations": [a for a in data["annotations"] if a["image_id"] in kept_ids],
                }
        return data, ann_skips, image_skips

    def _build_targets(self, anns: list[dict], label_of: dict[int, int]):
        """Flat xyxy boxes and labels of all non-crowd, non-degenerate annotations, grouped by image
        (image k owns rows ``offsets[k]:offsets[k + 1]``)."""
        index_of = {image_id: k for k, image_id in enumerate(self.image_ids)}
        crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        self.num_crowd = int(crowd.sum())
        kept = [a for a, c in zip(anns, crowd) if not c]
        img_idx = np.asarray([index_of[a["image_id"]] for a in kept], dtype=np.int64)
        labels = np.asarray([label_of[a["category_id"]] for a in kept], dtype=np.int64)
        xywh = np.asarray([a["bbox"] for a in kept], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        hw = self._sizes[img_idx].astype(np.float64)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, hw[:, 1:2])
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, hw[:, 0:1])
        ok = ((boxes[:, 2] - boxes[:, 0]) >= self.min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.min_box_size)
        self.num_degenerate = int((~ok).sum())
        if self.num_degenerate:
            log.warning(
                "%s: dropped %d of %d boxes narrower or shorter than %g px (after clipping to the image) from "
                "training; those without area are not ground truths in the evaluation either", self.source,
                self.num_degenerate, len(kept), self.min_box_size,
            )
        # A box with no area (no width or no height inside the image) is no ground truth in the evaluation either:
        # marked as a crowd region (COCO's "ignore"), which no detection can match. The evaluator reads these dicts.
        no_area = ((boxes[:, 2] - boxes[:, 0]) <= 0) | ((boxes[:, 3] - boxes[:, 1]) <= 0)
        for ann, empty in zip(kept, no_area):
            if empty:
                ann["iscrowd"] = 1
        img_idx, labels, boxes = img_idx[ok], labels[ok], boxes[ok]
        order = np.argsort(img_idx, kind="stable")  # keeps the file's annotation order within an image
        counts = np.bincount(img_idx, minlength=len(self.image_ids))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return boxes[order].astype(np.float32), labels[order], offsets

    # ------------------------------------------------------------------ pycocotools object
    @property
    def _source_name(self) -> str:
        return self.ann_file.name if self.ann_file is not None else self.source

    @property
    def coco(self) -> COCO:
        """The pycocotools ``COCO`` of the annotation file (all annotations, crowds included; with ``skip_bad``
        without what was skipped when the dataset was built)."""
        if self._coco is None:  # dropped when pickled to a loader worker; reloaded only if asked for
            self._coco = make_coco(self._load(check_folder=False)[0])
        return self._coco

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_coco"] = None  # workers never need it; spawning them must not copy a large JSON
        return state

    # ------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / str(self._file_names[index])

    def targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Training targets of image ``index`` in original pixels: xyxy boxes float32 ``[N, 4]`` (clipped to
        the image), labels int64 ``[N]``. Copies, safe to modify."""
        a, b = self._offsets[index], self._offsets[index + 1]
        return self._boxes[a:b].copy(), self._labels[a:b].copy()

    def original_size(self, index: int) -> tuple[int, int]:
        """``(h, w)`` of image ``index`` as the annotation file gives it (the image is not read)."""
        h, w = self._sizes[index]
        return int(h), int(w)

    def read_image(self, index: int) -> np.ndarray:
        """The image as an HxWx3 uint8 RGB array; :class:`DatasetError` naming the file when it is missing,
        corrupt or not the size the annotation file says."""
        path = self.image_path(index)
        buf = read_file(
            path, missing=f"image listed in {self._source_name} (id {self.image_ids[index]}) does not exist"
        )
        image = decode_image(buf, _IMREAD_FLAGS, path)
        h, w = (int(v) for v in self._sizes[index])
        if image.shape[:2] != (h, w):
            said_by = str(self._size_files[index]) if self._size_files is not None else ""
            raise DatasetError(
                f"{path}: image is {image.shape[0]}x{image.shape[1]} (HxW) but {said_by or self._source_name} "
                f"says {h}x{w}"
            )
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def __getitem__(self, index: int) -> dict:
        """Sample ``index``. An index at or beyond ``len(self)`` is a *sample key* (as a resumable sampler yields:
        ``(epoch + 1) * len + i``): it reads image ``index % len`` and fixes its augmentation by the key."""
        index, key = sample_key_split(index, len(self))
        load = functools.partial(self._sample, sample_key=key)
        if self.skip_bad:
            return first_readable(index, len(self), load, self._bad, source=self.source, log=log)
        return load(index)

    def _sample(self, index: int, sample_key: int | None = None) -> dict:
        image = self.read_image(index)
        h, w = image.shape[:2]
        boxes, labels = self.targets(index)
        if sample_key is not None:
            out = self.transform(image, boxes, labels, sample_key=sample_key)
        else:
            out = self.transform(image, boxes, labels)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            "boxes": torch.from_numpy(np.asarray(out["boxes"], dtype=np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.asarray(out["labels"], dtype=np.int64).reshape(-1)),
            "image_id": int(self.image_ids[index]),
            "scale": float(out["scale"]),
            "orig_size": (h, w),
        }


def collate_detection(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples of :class:`CocoDetection` into batch tensors.

    Returns ``images`` uint8 ``[B, 3, S, S]``; ``boxes`` float32 ``[B, G, 4]`` and ``labels`` int64 ``[B, G]``
    padded to ``G`` = the most objects of any image in the batch (``G`` may be 0), padding boxes 0 and
    padding labels -1; ``image_ids`` int64 ``[B]``; ``scales`` float32 ``[B]``; ``orig_sizes`` int64 ``[B, 2]``
    (h, w).
    """
    if not samples:
        raise ValueError("collate_detection needs at least one sample")
    pad = torch.nn.utils.rnn.pad_sequence
    boxes = pad([s["boxes"].reshape(-1, 4).float() for s in samples], batch_first=True, padding_value=0.0)
    labels = pad([s["labels"].reshape(-1).long() for s in samples], batch_first=True, padding_value=-1)
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "boxes": boxes,
        "labels": labels,
        "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        "scales": torch.tensor([s["scale"] for s in samples], dtype=torch.float32),
        "orig_sizes": torch.tensor([tuple(s["orig_size"]) for s in samples], dtype=torch.int64).reshape(-1, 2),
    }
