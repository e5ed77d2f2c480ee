"""Pascal VOC XML annotations to a COCO instances JSON."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detprune.data.coco import DatasetError, problems_error
from detprune.utils.io import write_json

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
"""The 20 Pascal VOC classes in the usual order; category id = index + 1."""


def _text(node: ET.Element, tag: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"no <{tag}>")
    return child.text.strip()


def _parse_xml(
    xml_path: Path, cat_ids: dict[str, int]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """One VOC XML: (image entry without id, annotations without ids, problems)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {}, [], [f"{xml_path}: cannot read the XML ({exc})"]
    problems: list[str] = []
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
        return {}, [], [f"{xml_path}: bad image record ({exc})"]
    anns: list[dict[str, Any]] = []
    for pos, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"{xml_path}: object {pos} ({name or 'no name'})"
        if name not in cat_ids:
            problems.append(f"{where}: unknown class name {name!r}")
            continue
        try:
            bnd = obj.find("bndbox")
            if bnd is None:
                raise ValueError("no <bndbox>")
            x0, y0, x1, y1 = (float(_text(bnd, t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            difficult = int(obj.findtext("difficult") or 0)
        except ValueError as exc:
            problems.append(f"{where}: bad box ({exc})")
            continue
        w, h = x1 - x0 + 1.0, y1 - y0 + 1.0
        anns.append(
            {
                "category_id": cat_ids[name],
                "bbox": [x0 - 1.0, y0 - 1.0, w, h],
                "area": w * h,
                "iscrowd": 1 if difficult else 0,
            }
        )
    return image, anns, problems


def voc_to_coco(
    voc_root: Path, split: str, out_json: Path, classes: Sequence[str] = VOC_CLASSES
) -> dict[str, Any]:
    """Convert ``voc_root/ImageSets/Main/{split}.txt`` to a COCO JSON at ``out_json``.

    Image ids are 1..N in list order; ``file_name`` is relative to ``voc_root/JPEGImages``.
    VOC corners (1-based, inclusive) become x = xmin - 1, w = xmax - xmin + 1 (same for
    y). Difficult objects get ``iscrowd = 1`` so COCO evaluation ignores them. Raises
    :class:`DatasetError` naming each missing file, XML file and bad object.
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
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    problems: list[str] = []
    for voc_id in ids:
        xml_path = voc_root / "Annotations" / f"{voc_id}.xml"
        if not xml_path.is_file():
            problems.append(f"{xml_path}: annotation file not found (listed in {list_file})")
            continue
        image, objects, found = _parse_xml(xml_path, cat_ids)
        problems.extend(found)
        if not image:
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "voc_id": voc_id, **image})
        for obj in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, **obj})
    if problems:
        raise problems_error(f"VOC {split} split under {voc_root}", problems)
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
