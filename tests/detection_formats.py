"""Writing the synthetic shapes (datasets/synthetic.py) in the Pascal VOC and YOLO txt layouts, for tests and short
measured runs: the same images and boxes as the COCO-format copy, so the readers can be compared with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.sax.saxutils import escape

from datasets import write_synthetic_coco

__all__ = ["coco_source", "voc_xml", "write_voc", "write_yolo"]

SPLITS = (("train2017", "trainval"), ("val2017", "test"))


def coco_source(root: Path, *, num_train: int, num_val: int, image_size=(96, 128), seed: int = 0) -> Path:
    """The synthetic COCO-format folder the other layouts are written from."""
    return write_synthetic_coco(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)


def _load(coco_root: Path, split: str) -> tuple[dict, list[str], dict[int, int]]:
    data = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return data, [c["name"] for c in cats], {c["id"]: k for k, c in enumerate(cats)}


def voc_xml(file_name: str, width: int, height: int, objects: list[tuple[str, tuple[float, ...], int]],
            *, size: bool = True) -> str:
    """A VOC annotation: ``objects`` are (name, (xmin, ymin, xmax, ymax) in VOC's 1-based pixels, difficult)."""
    parts = [f"<annotation><folder>VOC</folder><filename>{escape(file_name)}</filename>"]
    if size:
        parts.append(f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>")
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(
            f"<object><name>{escape(name)}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x0:g}</xmin><ymin>{y0:g}</ymin><xmax>{x1:g}</xmax>"
            f"<ymax>{y1:g}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts)


def write_voc(coco_root: Path, out: Path, *, year: int = 2007) -> list[str]:
    """``out/VOC<year>/`` with the synthetic training images as ``trainval`` and the val images as ``test``. COCO's
    crowd regions become difficult objects. Returns the class names (category id order)."""
    folder = out / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for coco_split, voc_split in SPLITS:
        data, names, _ = _load(coco_root, coco_split)
        name_of = {c["id"]: c["name"] for c in data["categories"]}
        ids = []
        for img in sorted(data["images"], key=lambda im: im["id"]):
            stem = Path(img["file_name"]).stem
            ids.append(stem)
            shutil.copyfile(coco_root / coco_split / img["file_name"], folder / "JPEGImages" / f"{stem}.jpg")
            objects = []
            for ann in data["annotations"]:
                if ann["image_id"] != img["id"]:
                    continue
                x, y, w, h = ann["bbox"]
                objects.append((name_of[ann["category_id"]], (x + 1, y + 1, x + w, y + h), int(ann["iscrowd"])))
            (folder / "Annotations" / f"{stem}.xml").write_text(
                voc_xml(f"{stem}.jpg", img["width"], img["height"], objects))
        (folder / "ImageSets" / "Main" / f"{voc_split}.txt").write_text("\n".join(ids) + "\n")
    return names


def write_yolo(coco_root: Path, out: Path, *, yaml_name: str = "data.yaml") -> list[str]:
    """``out/images/{train,val}/`` and ``out/labels/{train,val}/`` with an id -> name map in ``out/<yaml_name>``.
    Crowd regions are left out; of the images without objects, the first, third, ... have an empty label file,
    the others none. Returns the class names."""
    names: list[str] = []
    empty = 0
    for coco_split, split in (("train2017", "train"), ("val2017", "val")):
        data, names, label_of = _load(coco_root, coco_split)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for img in sorted(data["images"], key=lambda im: im["id"]):
            stem = Path(img["file_name"]).stem
            shutil.copyfile(coco_root / coco_split / img["file_name"], out / "images" / split / f"{stem}.jpg")
            rows = []
            for ann in data["annotations"]:
                if ann["image_id"] != img["id"] or ann["iscrowd"]:
                    continue
                x, y, w, h = ann["bbox"]
                W, H = img["width"], img["height"]
                rows.append(f"{label_of[ann['category_id']]} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} "
                            f"{w / W:.6f} {h / H:.6f}")
            if not rows:
                empty += 1
                if empty % 2 == 0:
                    continue  # no label file at all
            (out / "labels" / split / f"{stem}.txt").write_text("".join(r + "\n" for r in rows))
    yaml_lines = ["path: .", "train: images/train", "val: images/val", "names:"]
    yaml_lines += [f"  {k}: {n}" for k, n in enumerate(names)]
    (out / yaml_name).write_text("\n".join(yaml_lines) + "\n")
    return names
