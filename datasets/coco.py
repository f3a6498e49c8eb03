"""COCO-format detection dataset (pycocotools) and the batch collate function."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from .errors import DatasetError, DatasetNotFoundError

__all__ = ["CocoDetection", "collate_detection", "load_coco_annotations", "LABEL_MODES"]

log = logging.getLogger(__name__)

#: "contiguous": label k is the k-th category in id order (num_classes = number of categories);
#: "category_id": label = category id - 1 (COCO's 90-class label space, as the published EfficientDet models).
LABEL_MODES = ("contiguous", "category_id")


def load_coco_annotations(ann_file: str | Path) -> COCO:
    """Load and validate a COCO instances file; errors name the file and the problem."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetNotFoundError(f"annotation file not found: {ann_file}")
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{ann_file}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing or invalid '{key}' list")
    image_ids = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not {"id", "file_name", "height", "width"} <= set(img):
            raise DatasetError(f"{ann_file}: images[{i}] needs id, file_name, height and width")
        image_ids.add(img["id"])
    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not {"id", "name"} <= set(cat):
            raise DatasetError(f"{ann_file}: categories[{i}] needs id and name")
        cat_ids.add(cat["id"])
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"id", "image_id", "category_id", "bbox"} <= set(ann):
            raise DatasetError(f"{ann_file}: annotations[{i}] needs id, image_id, category_id and bbox")
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{ann_file}: annotation id {ann['id']} refers to unknown image id {ann['image_id']}")
        if ann["category_id"] not in cat_ids:
            raise DatasetError(
                f"{ann_file}: annotation id {ann['id']} has category id {ann['category_id']}, "
                "which is not in the categories list"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetError(f"{ann_file}: annotation id {ann['id']} has a malformed bbox {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetError(f"{ann_file}: annotation id {ann['id']} has a negative box size {bbox!r}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """Images and boxes of a COCO instances file.

    Crowd annotations are kept in ``coco`` (evaluation uses them) but are not training targets; boxes with
    width or height below ``min_box_size`` are dropped and counted in ``num_degenerate``. Images without
    objects are kept and train as pure background.

    Each sample: ``image`` uint8 ``[3, S, S]``, ``boxes`` float32 ``[N, 4]`` xyxy in network pixels,
    ``labels`` int64 ``[N]``, ``image_id``, ``scale`` (network pixels per original pixel), ``orig_size`` (h, w).
    """

    def __init__(
        self,
        *,
        image_dir: str | Path,
        ann_file: str | Path,
        transform: Callable,
        min_box_size: float = 1.0,
        label_mode: str = "contiguous",
        num_classes: int | None = None,
    ) -> None:
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        if not self.image_dir.is_dir():
            raise DatasetNotFoundError(f"image folder not found: {self.image_dir}")
        self.coco = load_coco_annotations(self.ann_file)
        self.transform = transform
        self.label_mode = label_mode
        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        if label_mode == "contiguous":
            self.cat_ids = [c["id"] for c in cats]
            self.class_names = [c["name"] for c in cats]
            label_of = {cid: k for k, cid in enumerate(self.cat_ids)}
        else:
            size = num_classes if num_classes is not None else max(c["id"] for c in cats)
            if max(c["id"] for c in cats) > size or min(c["id"] for c in cats) < 1:
                raise DatasetError(f"{self.ann_file}: category ids must lie in 1..{size} for label_mode=category_id")
            names = {c["id"]: c["name"] for c in cats}
            self.cat_ids = list(range(1, size + 1))
            self.class_names = [names.get(i, f"unused_{i}") for i in self.cat_ids]
            label_of = {cid: cid - 1 for cid in names}
        self.num_classes = len(self.cat_ids)
        self.image_ids = sorted(self.coco.imgs)
        self.num_degenerate = 0
        self.num_crowd = 0
        self._targets: list[tuple[np.ndarray, np.ndarray]] = []
        for image_id in self.image_ids:
            boxes, labels = [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    self.num_crowd += 1
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                if w < min_box_size or h < min_box_size:
                    self.num_degenerate += 1
                    continue
                boxes.append((x, y, x + w, y + h))
                labels.append(label_of[ann["category_id"]])
            self._targets.append(
                (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64))
            )
        if self.num_degenerate:
            log.warning(
                "%s: dropped %d boxes with width or height < %s px", self.ann_file, self.num_degenerate, min_box_size
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def read_image(self, index: int) -> np.ndarray:
        info = self.coco.imgs[self.image_ids[index]]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise DatasetError(f"{path}: image listed in {self.ann_file.name} (id {info['id']}) does not exist")
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(f"{path}: cannot be decoded as an image (corrupt or truncated file?)")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def __getitem__(self, index: int) -> dict:
        image = self.read_image(index)
        h, w = image.shape[:2]
        boxes, labels = self._targets[index]
        boxes = boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        out = self.transform(image, boxes, labels)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            "boxes": torch.from_numpy(out["boxes"]).reshape(-1, 4),
            "labels": torch.from_numpy(out["labels"]).reshape(-1),
            "image_id": int(self.image_ids[index]),
            "scale": float(out["scale"]),
            "orig_size": (h, w),
        }


def collate_detection(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples into fixed-size tensors; boxes/labels padded to the most objects in the batch
    (padding label -1, padding box zeros)."""
    b = len(samples)
    g = max(len(s["labels"]) for s in samples)
    boxes = torch.zeros(b, g, 4, dtype=torch.float32)
    labels = torch.full((b, g), -1, dtype=torch.int64)
    for i, s in enumerate(samples):
        n = len(s["labels"])
        boxes[i, :n] = s["boxes"]
        labels[i, :n] = s["labels"]
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "boxes": boxes,
        "labels": labels,
        "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        "scales": torch.tensor([s["scale"] for s in samples], dtype=torch.float32),
        "orig_sizes": torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),
    }
