"""Pascal VOC detection data: a VOCdevkit (``VOC2007/``, ``VOC2012/``) or any folder in the VOC layout, as
labelImg and CVAT export it, read into an in-memory COCO-format dict for :class:`datasets.CocoDetection`.

Layout of one VOC folder::

    Annotations/<id>.xml          one file per image: <size>, and an <object> per box
    JPEGImages/<id>.jpg           (another image suffix is found too)
    ImageSets/Main/<split>.txt    the image ids of a split, one per line

Coordinates: ``<bndbox>`` holds 1-based, inclusive pixel indices (a box over the first ten pixel columns has
``xmin=1, xmax=10``). They become continuous pixel coordinates with (0, 0) at the image's top-left corner, the
convention of COCO boxes, as ``(xmin - 1, ymin - 1, xmax, ymax)``; VOC's IoU with its "+1" widths equals the plain
IoU of the converted boxes. ``xmin = xmax`` is a box one pixel wide.

Difficult objects (``<difficult>1</difficult>``) stay in the dict with ``"difficult": 1`` and ``"iscrowd": 1``: the
dataset leaves crowd regions out of the training targets, and COCO's evaluation ignores them (a detection on one
counts neither as a true nor as a false positive), as VOC's evaluation ignores difficult objects.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from ._coco_dict import IMAGE_SUFFIXES, BadEntry, Problems, coco_dict, header_size
from .errors import DatasetError, DatasetNotFoundError

__all__ = ["VOC_CLASSES", "load_voc", "voc_split_files"]

#: The 20 Pascal VOC classes, in the devkit's order (label k is the k-th).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: How far (pixels) a box may reach beyond its image before it is an error; within it, it is clipped.
BOX_TOLERANCE = 1.0


def _folders(root: Path, years: Sequence[int] | None) -> list[Path]:
    return [root / f"VOC{int(y)}" for y in years] if years else [root]


def voc_split_files(root: str | Path, years: Sequence[int] | None, split: str, *, every_year: bool) -> list[Path]:
    """The split lists ``<root>/VOC<year>/ImageSets/Main/<split>.txt`` of ``years`` (``None`` or empty: ``root``
    is itself one VOC folder). ``every_year``: each year must have the split (training); otherwise the years
    that have it are used and at least one must (VOC2012's test annotations are not public).

    Raises :class:`DatasetNotFoundError` naming what is missing and how to point the config at the data."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Pascal VOC data not found: {root} does not exist (data.root={root}). Point data.root at a VOCdevkit "
            "folder (VOC2007/, VOC2012/, each with Annotations/, JPEGImages/ and ImageSets/Main/), or at one folder "
            "in that layout with data.years=null"
        )
    found = []
    for folder in _folders(root, years):
        for sub in ("Annotations", "JPEGImages"):
            if not (folder / sub).is_dir():
                present = sorted(int(p.name[3:]) for p in root.glob("VOC[0-9][0-9][0-9][0-9]") if p.is_dir())
                hint = (f"set data.years to the years present: data.years={present}" if years and present
                        else "data.years=null reads Annotations/ and JPEGImages/ directly under data.root")
                raise DatasetNotFoundError(f"Pascal VOC data not found: {folder / sub} does not exist ({hint})")
        split_file = folder / "ImageSets" / "Main" / f"{split}.txt"
        if split_file.is_file():
            found.append(split_file)
        elif every_year:
            raise DatasetNotFoundError(
                f"Pascal VOC split not found: {split_file} does not exist (split {split!r}; the split lists of "
                f"{folder.name} are {_split_names(folder)})"
            )
    if not found:
        raise DatasetNotFoundError(
            f"Pascal VOC split not found: no ImageSets/Main/{split}.txt under "
            f"{', '.join(str(f) for f in _folders(root, years))} (split {split!r}). VOC2012's test annotations are "
            "not public: evaluate on VOC2007's test split (data.years=[2007, 2012] reads it) or on data.val_split=val"
        )
    return found


def _split_names(folder: Path) -> list[str]:
    main = folder / "ImageSets" / "Main"
    return sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem) if main.is_dir() else []


def load_voc(
    split_files: Sequence[Path],
    *,
    root: str | Path,
    class_names: Sequence[str] = VOC_CLASSES,
    skip_bad: bool = False,
) -> tuple[dict, str]:
    """Read the images of ``split_files`` (from :func:`voc_split_files`) and their annotations.

    Returns the COCO-format dict (image ``file_name`` relative to ``root``, image ids 1..N in list order, category
    id k + 1 for ``class_names[k]``) and the name of its source for messages. A bad entry raises
    :class:`DatasetError` naming the file and the line or object: a split list line that is not one image id or
    repeats one, a missing annotation or image file, XML that is not well-formed or lacks a size the image header
    cannot give, an object without a name or a box, with an unknown class name, a box with ``xmax < xmin`` or
    ``ymax < ymin`` or reaching more than :data:`BOX_TOLERANCE` pixels beyond its image. With ``skip_bad`` bad
    images and objects are dropped instead, and one warning counts them by reason.
    """
    root = Path(root).expanduser()
    label_of = {name: k for k, name in enumerate(class_names)}
    problems = Problems(skip_bad)
    images: list[dict] = []
    annotations: list[dict] = []
    source = " + ".join(str(f) for f in split_files)
    for split_file in split_files:
        folder = split_file.parents[2]
        files = _image_files(folder / "JPEGImages")
        for line_no, image_id in _split_ids(split_file, problems):
            xml_path = folder / "Annotations" / f"{image_id}.xml"
            where = f"{split_file}, line {line_no}"
            if not xml_path.is_file():
                problems.image("missing annotation file", f"{where}: image {image_id!r} has no annotation file "
                               f"{xml_path}", missing=True)
                continue
            name = files.get(image_id)
            if name is None:
                problems.image("missing image file", f"{where}: image {image_id!r} has no file in "
                               f"{folder / 'JPEGImages'} ({image_id}.jpg or another image suffix)", missing=True)
                continue
            image_path = folder / "JPEGImages" / name
            try:
                size, objects = _parse(xml_path)
                height, width = size if size is not None else header_size(image_path)
            except BadEntry as err:
                problems.image(err.reason, str(err))
                continue
            except DatasetError as err:  # the image header, read for want of a <size>
                problems.image("unreadable image", str(err))
                continue
            image = {"id": len(images) + 1, "file_name": image_path.relative_to(root).as_posix(),
                     "height": height, "width": width, "annotation_file": str(xml_path)}
            images.append(image)
            for index, obj in enumerate(objects, 1):
                ann = _annotation(obj, xml_path, index, width, height, label_of, problems)
                if ann is not None:
                    annotations.append({"image_id": image["id"], **ann})
    problems.report(source)
    if not images:
        raise DatasetError(f"{source}: no image to use" + (" (every image was skipped)" if problems.images else
                                                            " (the split lists are empty)"))
    return coco_dict(images, annotations, class_names, f"Pascal VOC: {source}"), source


def _image_files(folder: Path) -> dict[str, str]:
    """Image id -> file name in ``folder`` (one listing; ``<id>.jpg`` preferred when an id has several files)."""
    out: dict[str, str] = {}
    for path in sorted(folder.iterdir(), key=lambda p: (p.suffix.lower() != ".jpg", p.name)):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            out.setdefault(path.stem, path.name)
    return out


def _split_ids(split_file: Path, problems: Problems) -> list[tuple[int, str]]:
    """``(line number, image id)`` of each non-blank line of a split list."""
    try:
        lines = split_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{split_file}: cannot be read ({err})") from err
    out, seen = [], {}
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            problems.image("malformed split list line", f"{split_file}, line {n}: expected one image id, found "
                           f"{line.strip()!r} (a class list such as aeroplane_trainval.txt is no split list)")
            continue
        if fields[0] in seen:
            problems.image("repeated image id", f"{split_file}, line {n}: image id {fields[0]!r} is listed again "
                           f"(first on line {seen[fields[0]]})")
            continue
        seen[fields[0]] = n
        out.append((n, fields[0]))
    return out


def _parse(xml_path: Path) -> tuple[tuple[int, int] | None, list[ET.Element]]:
    """``(height, width)`` from ``<size>`` (None when absent or zero) and the ``<object>`` elements."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise BadEntry("malformed XML", f"{xml_path}: not well-formed XML ({err})") from err
    except OSError as err:
        raise BadEntry("unreadable annotation file", f"{xml_path}: cannot be read ({err})") from err
    if root.tag != "annotation":
        raise BadEntry("malformed XML", f"{xml_path}: not a VOC annotation XML (its root element is <{root.tag}>, not "
                           "<annotation>)")
    size = root.find("size")
    hw = None
    if size is not None:
        try:
            w, h = (float((size.findtext(k) or "0").strip()) for k in ("width", "height"))
        except ValueError as err:
            raise BadEntry("invalid image size", f"{xml_path}: <size> holds no numbers ({err})") from err
        if w > 0 and h > 0:
            if not (w.is_integer() and h.is_integer()):
                raise BadEntry("invalid image size", f"{xml_path}: <size> is not whole pixels ({w:g} x {h:g})")
            hw = (int(h), int(w))
        elif w < 0 or h < 0:
            raise BadEntry("invalid image size", f"{xml_path}: <size> is negative ({w:g} x {h:g})")
    return hw, root.findall("object")


def _annotation(obj: ET.Element, xml_path: Path, index: int, width: int, height: int, label_of: dict[str, int],
                problems: Problems) -> dict | None:
    """The COCO annotation (without ids) of ``<object>`` number ``index`` (1-based), or None when it is bad."""
    where = f"{xml_path}: <object> {index}"
    name = (obj.findtext("name") or "").strip()
    if not name:
        problems.object("object without a name", f"{where} has no <name>")
        return None
    if name not in label_of:
        shown = sorted(label_of)[:25]
        problems.object("unknown class", f"{where} is a {name!r}, which is not in data.class_names "
                        f"({', '.join(shown)}{', ...' if len(label_of) > len(shown) else ''})")
        return None
    box = obj.find("bndbox")
    try:
        if box is None:
            raise ValueError("no <bndbox>")
        xmin, ymin, xmax, ymax = (float(_text(box, k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        difficult = int(float((obj.findtext("difficult") or "0").strip() or "0"))
    except ValueError as err:
        problems.object("malformed object", f"{where} ({name}): {err}")
        return None
    if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
        problems.object("malformed box", f"{where} ({name}): non-finite coordinates")
        return None
    x0, y0, x1, y1 = xmin - 1.0, ymin - 1.0, xmax, ymax
    if x1 <= x0 or y1 <= y0:
        problems.object("negative box size", f"{where} ({name}): xmax {xmax:g} < xmin {xmin:g} or ymax {ymax:g} < "
                        f"ymin {ymin:g}")
        return None
    tol = BOX_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        problems.object(
            "box outside the image",
            f"{where} ({name}): box xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g} reaches beyond its "
            f"image ({width}x{height} WxH; VOC pixels run 1..{width} and 1..{height})",
        )
        return None
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    w, h = x1 - x0, y1 - y0
    return {"category_id": label_of[name] + 1, "bbox": [x0, y0, w, h], "area": w * h,
            "iscrowd": int(difficult != 0), "difficult": int(difficult != 0)}


def _text(box: ET.Element, key: str) -> str:
    text = box.findtext(key)
    if text is None or not text.strip():
        raise ValueError(f"no <{key}> in <bndbox>")
    try:
        float(text)
    except ValueError:
        raise ValueError(f"<{key}> is {text.strip()!r}, not a number") from None
    return text
