"""Reading and checking a COCO instances JSON file, whatever tool wrote it: every entry the detection dataset
and the evaluation rely on is validated, and an error names the file and the entry."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from ._skip import skip_summary
from .errors import DatasetError, DatasetNotFoundError

__all__ = ["load_checked", "load_coco_annotations", "make_coco"]

log = logging.getLogger(__name__)

_IMAGE_FIELDS = ("id", "file_name", "height", "width")
_ANN_FIELDS = ("id", "image_id", "category_id", "bbox")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _contains(container, value) -> bool:
    try:
        return value in container
    except TypeError:  # an unhashable id (a list, an object) is in no index
        return False


def _read_json(ann_file: Path) -> dict:
    """The parsed file; the checks every COCO file must pass (what ``skip_bad`` cannot repair)."""
    if not ann_file.is_file():
        raise DatasetNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{ann_file}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing or invalid '{key}' list")
    if not data["categories"]:
        raise DatasetError(f"{ann_file}: the 'categories' list is empty")
    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not {"id", "name"} <= cat.keys() or not _is_int(cat["id"]):
            raise DatasetError(f"{ann_file}: categories[{i}] needs an integer id and a name")
        if cat["id"] in cat_ids:
            raise DatasetError(f"{ann_file}: category id {cat['id']} appears more than once")
        cat_ids.add(cat["id"])
    return data


def _check_images(ann_file: Path, images: list, skip_bad: bool) -> tuple[list[dict], Counter, set]:
    """The valid image entries; with ``skip_bad`` the others are dropped and counted, else the first raises."""
    kept, skipped, skipped_ids, seen = [], Counter(), set(), set()
    for i, img in enumerate(images):
        problem = message = None
        if not isinstance(img, dict) or not set(_IMAGE_FIELDS) <= img.keys() or not _is_int(img["id"]):
            problem = "invalid image entry"
            message = f"{ann_file}: images[{i}] needs id (an integer), file_name, height and width"
        elif img["id"] in seen:  # which of the two would the annotations mean? Not repairable.
            raise DatasetError(f"{ann_file}: image id {img['id']} appears more than once")
        elif not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and v > 0
            for v in (img["height"], img["width"])
        ):
            problem = "invalid image size"
            message = f"{ann_file}: image id {img['id']} has an invalid size {img['height']}x{img['width']}"
        if problem is None:
            seen.add(img["id"])
            kept.append(img)
            continue
        if not skip_bad:
            raise DatasetError(message)
        skipped[problem] += 1
        if isinstance(img, dict) and _is_int(img.get("id")):
            skipped_ids.add(img["id"])
    return kept, skipped, skipped_ids


def _check_annotations(
    ann_file: Path, anns: list, images: list[dict], cat_ids: set, skipped_image_ids: set, skip_bad: bool
) -> tuple[list[dict], Counter]:
    """The valid annotations; with ``skip_bad`` the others are dropped and counted, else the first raises.

    Boxes that cross the border are valid (the dataset clips them); a box entirely outside its image, with a
    negative width or height, or with non-finite numbers is not.
    """
    size_of = {img["id"]: (float(img["width"]), float(img["height"])) for img in images}
    kept, sizes, skipped = [], [], Counter()
    for i, ann in enumerate(anns):
        problem = message = None
        if not isinstance(ann, dict):
            problem, message = "not a JSON object", f"{ann_file}: annotations[{i}] is not a JSON object"
        elif missing := [k for k in _ANN_FIELDS if k not in ann]:
            problem = f"no {missing[0]}"
            message = (
                f"{ann_file}: annotations[{i}] needs id, image_id, category_id and bbox "
                f"(it has no {' and no '.join(missing)})"
            )
        elif _contains(skipped_image_ids, ann["image_id"]):
            continue  # goes with its (skipped) image, which is counted already
        elif not _contains(size_of, ann["image_id"]):
            problem = "unknown image id"
            message = f"{ann_file}: annotation id {ann['id']} refers to unknown image id {ann['image_id']}"
        elif not _contains(cat_ids, ann["category_id"]):
            problem = "unknown category id"
            message = (
                f"{ann_file}: annotation id {ann['id']} has category id {ann['category_id']}, "
                "which is not in the categories list"
            )
        elif not (
            isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ann["bbox"])
        ):
            problem = "malformed bbox"
            message = f"{ann_file}: annotation id {ann['id']} has a malformed bbox {ann['bbox']!r}"
        if problem is None:
            kept.append(ann)
            sizes.append(size_of[ann["image_id"]])
            continue
        if not skip_bad:
            raise DatasetError(message)
        skipped[problem] += 1
    if not kept:
        return kept, skipped

    boxes = np.asarray([a["bbox"] for a in kept], dtype=np.float64).reshape(-1, 4)
    wh = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    with np.errstate(invalid="ignore"):
        nonfinite = ~np.isfinite(boxes).all(1)
        negative = ~nonfinite & ((boxes[:, 2] < 0) | (boxes[:, 3] < 0))
        x0, y0 = boxes[:, 0], boxes[:, 1]
        x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
        # No point in common with the image, not even its border (a box touching the border is degenerate, the
        # dataset's min_box_size drops it).
        outside = ~nonfinite & ~negative & ((x0 > wh[:, 0]) | (y0 > wh[:, 1]) | (x1 < 0) | (y1 < 0))
    checks = (
        (nonfinite, "non-finite bbox", "has a non-finite bbox {bbox!r}"),
        (negative, "negative box size", "has a negative box size {bbox!r} (width and height must be >= 0)"),
        (
            outside,
            "box outside the image",
            "has a box {bbox!r} (x, y, w, h) entirely outside its image (image id {image_id}: {w:g} wide, {h:g} high)",
        ),
    )
    bad = np.zeros(len(kept), dtype=bool)
    for mask, problem, template in checks:
        if not mask.any():
            continue
        if not skip_bad:
            k = int(np.flatnonzero(mask)[0])
            ann = kept[k]
            detail = template.format(bbox=ann["bbox"], image_id=ann["image_id"], w=wh[k, 0], h=wh[k, 1])
            raise DatasetError(f"{ann_file}: annotation id {ann['id']} {detail}")
        skipped[problem] += int(mask.sum())
        bad |= mask
    if bad.any():
        kept = [a for a, b in zip(kept, bad) if not b]
    return kept, skipped


def load_checked(ann_file: Path, *, skip_bad: bool) -> tuple[dict, Counter, Counter]:
    """The validated file contents (bad entries dropped with ``skip_bad``) and the counts of skipped annotations
    and images by reason."""
    data = _read_json(ann_file)
    cat_ids = {c["id"] for c in data["categories"]}
    images, image_skips, skipped_ids = _check_images(ann_file, data["images"], skip_bad)
    anns, ann_skips = _check_annotations(ann_file, data["annotations"], images, cat_ids, skipped_ids, skip_bad)
    return {**data, "images": images, "annotations": _for_evaluation(ann_file, anns)}, ann_skips, image_skips


def _for_evaluation(ann_file: Path, anns: list[dict]) -> list[dict]:
    """The annotations as COCO evaluation needs them, whatever tool wrote the file.

    - ``iscrowd`` missing: 0; ``area`` missing: the box's area (pycocotools reads both for every annotation, and
      ``area`` decides the small / medium / large ranges).
    - Ids that are not unique positive integers are renumbered 1..N: pycocotools finds ground truths by id and
      takes id 0 for "unmatched", so a box with id 0, or one of two with the same id, could never be matched
      (many converters count from 0; merged files repeat ids). Nothing else uses these ids.
    """
    ids = [a["id"] for a in anns]
    repeated = len(set(map(repr, ids))) != len(ids)  # repr: ids of any JSON type, hashable or not
    renumber = repeated or not all(_is_int(i) and i > 0 for i in ids)
    if renumber:
        log.warning("%s: annotation ids are not unique positive integers (%s): renumbered 1..%d for evaluation",
                    ann_file, "duplicates" if repeated else "0 or not an integer", len(anns))
    out = []
    for n, ann in enumerate(anns, 1):
        fill = {}
        if "iscrowd" not in ann:
            fill["iscrowd"] = 0
        if "area" not in ann:
            fill["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        if renumber:
            fill["id"] = n
        out.append({**ann, **fill} if fill else ann)
    return out


def make_coco(data: dict) -> COCO:
    """A pycocotools ``COCO`` of the (checked) file contents ``data``, its index built without its prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco_annotations(ann_file: str | Path, *, skip_bad: bool = False) -> COCO:
    """Load and validate a COCO instances file into a pycocotools ``COCO`` (its prints suppressed).

    Raises :class:`DatasetNotFoundError` when the file does not exist and :class:`DatasetError` naming the
    file and the problem when it is not JSON or lacks what a detection dataset needs. With ``skip_bad`` the bad
    annotations (unknown image or category id, no or malformed bbox, a box with a negative size or entirely
    outside its image) and bad image entries are dropped instead, and one warning counts them by reason; what no
    skipping can repair (not JSON, no categories, duplicate ids) still raises.
    """
    ann_file = Path(ann_file).expanduser()
    data, ann_skips, image_skips = load_checked(ann_file, skip_bad=skip_bad)
    summary = skip_summary(str(ann_file), annotation=ann_skips, image=image_skips)
    if summary:
        log.warning("%s", summary)
    return make_coco(data)
