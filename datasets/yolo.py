"""YOLO txt detection data (as Ultralytics, Roboflow and many labelling tools write it) read into an in-memory
COCO-format dict for :class:`datasets.CocoDetection`.

Layout: ``<root>/images/<split>/**/<name>.<jpg|png|...>`` with ``<root>/labels/<split>/**/<name>.txt`` (or Roboflow's
``<root>/<split>/images/`` with ``<root>/<split>/labels/``). A label file holds one row per object,
``class cx cy w h``: the class index (0-based) and the box centre, width and height as fractions of the image's
width and height. A row of more numbers, ``class x1 y1 x2 y2 ...`` (a polygon of at least three points, the
segmentation format), gives the polygon's bounding box. A missing or empty label file means an image without
objects. Image sizes come from the image files' headers; the fractions refer to the stored pixels (EXIF orientation
is not applied, as for COCO).

Class names come from the dataset YAML (``names:``, a list or an ``id: name`` map, as Ultralytics writes it) or
from the config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from ._coco_dict import IMAGE_SUFFIXES, Problems, coco_dict, header_size
from .errors import DatasetError, DatasetNotFoundError

__all__ = ["load_yolo", "read_yolo_names", "yolo_split_dirs"]

log = logging.getLogger(__name__)

#: How far a normalised value may lie outside [0, 1] (rounding in the tools that write them) before it is an error.
COORD_TOLERANCE = 1e-3


def yolo_split_dirs(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(image folder, label folder)`` of ``split``: ``images/<split>`` and ``labels/<split>``, or Roboflow's
    ``<split>/images`` and ``<split>/labels``; :class:`DatasetNotFoundError` saying what was looked for."""
    root = _existing_root(root)
    for image_dir, label_dir in ((root / "images" / split, root / "labels" / split),
                                 (root / split / "images", root / split / "labels")):
        if image_dir.is_dir():
            if not label_dir.is_dir():
                raise DatasetNotFoundError(f"YOLO labels not found: {label_dir} does not exist (the labels of "
                                           f"{image_dir}; an image without objects may simply have no label file)")
            return image_dir, label_dir
    raise DatasetNotFoundError(
        f"YOLO split not found: neither {root / 'images' / split} nor {root / split / 'images'} exists (split "
        f"{split!r}; the image folders under {root / 'images'} are {_subfolders(root / 'images')})"
    )


def _existing_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"YOLO data not found: {root} does not exist (data.root={root}). Point data.root at a folder with "
            "images/<split>/ and labels/<split>/ (and the dataset YAML with the class names)"
        )
    return root


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def read_yolo_names(root: str | Path, yaml_file: str | Path | None = None) -> list[str]:
    """The class names of a YOLO dataset: ``names:`` of ``yaml_file`` (relative to ``root``), or of the one
    ``*.yaml`` / ``*.yml`` file in ``root`` when ``yaml_file`` is None. ``names`` is a list, or a map of ids
    ``0..n-1`` to names; ``nc``, when present, must equal its length. Errors name the file and what is wrong."""
    import yaml

    root = _existing_root(root)
    if yaml_file is None:
        found = sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not found:
            raise DatasetNotFoundError(
                f"YOLO class names not found: no dataset YAML (*.yaml with names:) in {root}; name the classes with "
                "data.class_names=[...] or the file with data.yaml_file=..."
            )
        if len(found) > 1:
            raise DatasetError(f"{root}: several YAML files ({', '.join(p.name for p in found)}): pick the one with "
                               "the class names with data.yaml_file=... (or give data.class_names=[...])")
        path = found[0]
    else:
        path = root / Path(yaml_file).expanduser()
        if not path.is_file():
            raise DatasetNotFoundError(f"YOLO dataset YAML not found: {path} does not exist (data.yaml_file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DatasetError(f"{path}: not a readable YAML file ({' '.join(str(err).split())})") from err
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        keys = list(names)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or set(keys) != set(
                range(len(keys))):
            raise DatasetError(f"{path}: the keys of 'names' must be the class ids 0..{len(keys) - 1}, found "
                               f"{', '.join(map(str, keys))}")
        names = [names[k] for k in range(len(keys))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: no 'names:' with the class names (a list, or a map of class ids to names)")
    names = [str(n) for n in names]
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise DatasetError(f"{path}: nc is {nc} but 'names' has {len(names)} entries")
    return names


def load_yolo(
    image_dir: str | Path,
    label_dir: str | Path,
    *,
    class_names: Sequence[str],
    skip_bad: bool = False,
) -> tuple[dict, str]:
    """Read the images under ``image_dir`` (recursively, sorted by path) and their label files.

    Returns the COCO-format dict (``file_name`` relative to ``image_dir``, image ids 1..N, category id k + 1 for
    ``class_names[k]``, boxes clipped to the image) and the name of its source for messages. A bad row raises
    :class:`DatasetError` naming the label file and line: not 5 numbers (or a polygon of at least three points), a
    value that is no number, a class id that is no integer in ``0..len(class_names)-1``, a coordinate outside
    [0, 1] (beyond :data:`COORD_TOLERANCE`); so does an image whose header cannot be read. With ``skip_bad`` bad
    rows and images are dropped instead, and one warning counts them by reason.
    """
    image_dir, label_dir = Path(image_dir).expanduser(), Path(label_dir).expanduser()
    problems = Problems(skip_bad)
    paths = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DatasetError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    images: list[dict] = []
    annotations: list[dict] = []
    used_labels = set()
    for path in paths:
        rel = path.relative_to(image_dir)
        label = label_dir / rel.with_suffix(".txt")
        try:
            height, width = header_size(path)
        except DatasetError as err:
            problems.image("unreadable image", str(err))
            continue
        image = {"id": len(images) + 1, "file_name": rel.as_posix(), "height": height, "width": width}
        images.append(image)
        if not label.is_file():
            continue
        used_labels.add(label)
        for ann in _read_label(label, width, height, len(class_names), problems):
            annotations.append({"image_id": image["id"], **ann})
    _warn_unused_labels(label_dir, used_labels, image_dir)
    source = str(label_dir)
    problems.report(source)
    if not images:
        raise DatasetError(f"{image_dir}: no image to use (every image was skipped)")
    return coco_dict(images, annotations, class_names, f"YOLO: {image_dir}"), source


def _read_label(label: Path, width: int, height: int, num_classes: int, problems: Problems) -> list[dict]:
    try:
        lines = label.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        problems.object("unreadable label file", f"{label}: cannot be read ({err})")
        return []
    out = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        box = _row_box(fields, f"{label}, line {n}", num_classes, problems)
        if box is None:
            continue
        k, (x0, y0, x1, y1) = box
        x0, x1 = min(max(x0, 0.0), 1.0) * width, min(max(x1, 0.0), 1.0) * width
        y0, y1 = min(max(y0, 0.0), 1.0) * height, min(max(y1, 0.0), 1.0) * height
        w, h = x1 - x0, y1 - y0
        out.append({"category_id": k + 1, "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})
    return out


def _row_box(fields: list[str], where: str, num_classes: int, problems: Problems):
    """``(class index, normalised xyxy)`` of one row, or None (counted or raised) when it is bad."""
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        problems.object("wrong number of fields", f"{where}: expected 5 numbers (class cx cy w h) or a polygon "
                        f"(class x1 y1 x2 y2 x3 y3 ...), found {len(fields)} field(s)")
        return None
    try:
        values = [float(v) for v in fields]
    except ValueError:
        bad = next(v for v in fields if not _is_number(v))
        problems.object("not a number", f"{where}: {bad!r} is not a number")
        return None
    if not all(math.isfinite(v) for v in values):
        problems.object("not a number", f"{where}: non-finite value in {' '.join(fields)!r}")
        return None
    cls, coords = values[0], values[1:]
    if not cls.is_integer() or not 0 <= cls < num_classes:
        problems.object("class id out of range", f"{where}: class id {fields[0]} is not one of 0..{num_classes - 1} "
                        f"({num_classes} class names)")
        return None
    tol = COORD_TOLERANCE
    if not all(-tol <= v <= 1 + tol for v in coords):
        problems.object("coordinate outside [0, 1]", f"{where}: coordinates must be fractions of the image size "
                        f"in [0, 1], found {' '.join(fields[1:])} (pixel coordinates?)")
        return None
    if len(fields) == 5:
        cx, cy, w, h = coords
        return int(cls), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    xs, ys = coords[0::2], coords[1::2]
    return int(cls), (min(xs), min(ys), max(xs), max(ys))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _warn_unused_labels(label_dir: Path, used: set[Path], image_dir: Path) -> None:
    """A label file without an image is unused; many such files usually mean names that do not match."""
    unused = [p for p in label_dir.rglob("*.txt") if p not in used and p.name != "classes.txt"]
    if unused:
        log.warning("%s: %d label file(s) have no image in %s and are not used (e.g. %s)", label_dir, len(unused),
                    image_dir, unused[0].name)
