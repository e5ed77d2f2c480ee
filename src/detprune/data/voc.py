"""Pascal VOC XML annotations to a COCO instances JSON."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detprune.data.coco import BOX_TOLERANCE, DatasetError, problems_error
from detprune.utils.io import write_json

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
"""The 20 Pascal VOC classes in the usual order; category id = index + 1."""

Size = tuple[int, int]


def _text(node: ET.Element, tag: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"no <{tag}>")
    return child.text.strip()


def _image_record(
    root: ET.Element, xml_path: Path, image_dir: Path
) -> tuple[dict[str, Any], Size | None, list[str]]:
    """(image entry without id, or {}; its size if positive; problems) of one XML file."""
    try:
        size = root.find("size")
        if size is None:
            raise ValueError("no <size>")
        image = {
            "file_name": _text(root, "filename"),
            "width": int(float(_text(size, "width"))),
            "height": int(float(_text(size, "height"))),
        }
    except ValueError as exc:
        return {}, None, [f"{xml_path}: bad image record ({exc})"]
    problems: list[str] = []
    wh: Size | None = (image["width"], image["height"])
    if min(image["width"], image["height"]) <= 0:
        problems.append(f"{xml_path}: image size {wh[0]}x{wh[1]} is not positive")
        wh = None
    path = image_dir / image["file_name"]
    if not path.is_file():
        problems.append(f"{xml_path}: image file not found: {path}")
    return image, wh, problems


def _box(obj: ET.Element) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) of an <object>; ValueError naming what is missing or bad."""
    bnd = obj.find("bndbox")
    if bnd is None:
        raise ValueError("no <bndbox>")
    corners = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = _text(bnd, tag)
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            raise ValueError(f"<{tag}> {text!r} is not a finite number")
        corners.append(v)
    x0, y0, x1, y1 = corners
    return x0, y0, x1, y1


def _box_problems(box: tuple[float, float, float, float], size: Size | None) -> list[str]:
    """What is wrong with a VOC box: corners in the wrong order, or outside the image.

    VOC corners are 1-based and inclusive (width = xmax - xmin + 1, as the VOC devkit
    counts), so xmax == xmin is a one-pixel box and only xmax < xmin has no size. The
    image spans 1..width; like ``data check`` on the converted box, a box may reach
    BOX_TOLERANCE (1 px) past it: xmin, ymin >= 0 and xmax <= width + 1,
    ymax <= height + 1, so files of 0-based exporters convert.
    """
    x0, y0, x1, y1 = box
    shown = f"[xmin {x0:g}, ymin {y0:g}, xmax {x1:g}, ymax {y1:g}]"
    out = []
    inverted = [m for m, bad in (("xmax < xmin", x1 < x0), ("ymax < ymin", y1 < y0)) if bad]
    if inverted:
        out.append(f"box {shown} has non-positive size ({', '.join(inverted)})")
    tol = BOX_TOLERANCE
    if size is not None and (min(x0, y0) < 1 - tol or x1 > size[0] + tol or y1 > size[1] + tol):
        out.append(f"box {shown} extends outside the {size[0]}x{size[1]} image")
    return out


def _object(
    obj: ET.Element, where: str, cat_ids: dict[str, int], size: Size | None
) -> tuple[dict[str, Any] | None, list[str]]:
    """(annotation without ids, or None; problems) of one <object>, all its problems."""
    name = (obj.findtext("name") or "").strip()
    problems = [] if name in cat_ids else [f"unknown class name {name!r}"]
    try:
        box = _box(obj)
    except ValueError as exc:
        box = None
        problems.append(f"bad box ({exc})")
    difficult_text = (obj.findtext("difficult") or "").strip() or "0"
    try:
        difficult = int(difficult_text)
    except ValueError:
        difficult = 0
        problems.append(f"<difficult> {difficult_text!r} is not an integer")
    if box is not None:
        problems.extend(_box_problems(box, size))
    if problems or box is None:
        return None, [f"{where}: {p}" for p in problems]
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1.0, y1 - y0 + 1.0
    ann = {
        "category_id": cat_ids[name],
        "bbox": [x0 - 1.0, y0 - 1.0, w, h],
        "area": w * h,
        "iscrowd": 1 if difficult else 0,
    }
    return ann, []


def _parse_xml(
    xml_path: Path, cat_ids: dict[str, int], image_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """One VOC XML: (image entry without id, annotations without ids, problems)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {}, [], [f"{xml_path}: cannot read the XML ({exc})"]
    image, size, problems = _image_record(root, xml_path, image_dir)
    anns: list[dict[str, Any]] = []
    for pos, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        ann, found = _object(obj, f"{xml_path}: object {pos} ({name or 'no name'})", cat_ids, size)
        problems.extend(found)
        if ann is not None:
            anns.append(ann)
    return image, anns, problems


def _convert_split(
    voc_root: Path, ids: list[str], list_file: Path, cat_ids: dict[str, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(images, annotations, problems) of the listed ids: every problem, in list order."""
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    problems: list[str] = []
    for voc_id in ids:
        xml_path = voc_root / "Annotations" / f"{voc_id}.xml"
        if not xml_path.is_file():
            problems.append(f"{xml_path}: annotation file not found (listed in {list_file})")
            continue
        image, objects, found = _parse_xml(xml_path, cat_ids, voc_root / "JPEGImages")
        problems.extend(found)
        if not image:
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "voc_id": voc_id, **image})
        for obj in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, **obj})
    return images, anns, problems


def voc_to_coco(
    voc_root: Path, split: str, out_json: Path, classes: Sequence[str] = VOC_CLASSES
) -> dict[str, Any]:
    """Convert ``voc_root/ImageSets/Main/{split}.txt`` to a COCO JSON at ``out_json``.

    Image ids are 1..N in list order; ``file_name`` is relative to ``voc_root/JPEGImages``.
    VOC corners (1-based, inclusive) become x = xmin - 1, w = xmax - xmin + 1 (same for
    y). Difficult objects get ``iscrowd = 1`` so COCO evaluation ignores them (and
    training leaves them out); ``<truncated>`` is not read: truncated objects are
    ordinary ones. The whole split is checked before anything is written: an unreadable
    XML file, a bad image record, a missing image file, an unknown class name, a box with
    xmax < xmin or ymax < ymin or outside the image (see :func:`_box_problems`). If any
    is found, :class:`DatasetError` lists them all, each naming its XML file and, for an
    object, its index among the file's ``<object>`` elements counted from 0, and
    ``out_json`` is not written (an existing file stays as it was); the JSON is written
    atomically otherwise.
    """
    voc_root, out_json = Path(voc_root), Path(out_json)
    list_file = voc_root / "ImageSets" / "Main" / f"{split}.txt"
    try:
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise DatasetError(f"{list_file}: cannot read the image list ({exc})") from exc
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names are not unique: {list(classes)}")
    cat_ids = {name: i + 1 for i, name in enumerate(classes)}
    images, anns, problems = _convert_split(voc_root, ids, list_file, cat_ids)
    if problems:
        where = f"VOC {split} split under {voc_root} (objects counted from 0 in each XML file)"
        raise problems_error(where, problems)
    coco = {
        "info": {"description": f"Pascal VOC {split} split", "split": split},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": i, "name": name, "supercategory": "voc"} for name, i in cat_ids.items()
        ],
    }
    write_json(out_json, coco)
    per_class = {name: 0 for name in classes}
    for ann in anns:
        per_class[classes[ann["category_id"] - 1]] += 1
    return {
        "split": split,
        "out_json": str(out_json),
        "num_images": len(images),
        "num_annotations": len(anns),
        "num_difficult": sum(a["iscrowd"] for a in anns),
        "per_class": per_class,
    }
