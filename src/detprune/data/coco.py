"""COCO instance annotations: a checker that names every problem, and a torch dataset."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from detprune.data.transforms import Target, Transform

BOX_TOLERANCE = 1.0
"""How far (pixels) a box may reach past the image border before it is an error."""
MAX_LISTED = 50
"""Problems listed in a :class:`DatasetError` message before "... and N more"."""


class DatasetError(ValueError):
    """A dataset file is unreadable or inconsistent; the message lists every problem."""


def problems_error(source: str, problems: Sequence[str]) -> DatasetError:
    """A :class:`DatasetError` listing ``problems`` one per line (the first MAX_LISTED)."""
    lines = list(problems[:MAX_LISTED])
    if len(problems) > MAX_LISTED:
        lines.append(f"... and {len(problems) - MAX_LISTED} more")
    noun = "problem" if len(problems) == 1 else "problems"
    return DatasetError(f"{len(problems)} {noun} in {source}:\n" + "\n".join(lines))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the annotation file ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON ({exc})") from exc


def _check_images(
    src: str, images: list[Any], problems: list[str]
) -> dict[Any, tuple[int, int] | None]:
    """Check the image entries; return image id -> (width, height), None if unknown."""
    sizes: dict[Any, tuple[int, int] | None] = {}
    for pos, img in enumerate(images):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            problems.append(f"{src}: images[{pos}]: no integer 'id'")
            continue
        iid = img["id"]
        where = f"{src}: image id {iid}"
        if iid in sizes:
            problems.append(f"{where}: duplicate image id")
            continue
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            problems.append(f"{where}: no 'file_name'")
        w, h = img.get("width"), img.get("height")
        if _is_int(w) and _is_int(h) and w > 0 and h > 0:
            sizes[iid] = (w, h)
        else:
            problems.append(f"{where}: width/height {w!r}x{h!r} are not positive integers")
            sizes[iid] = None
    return sizes


def _check_categories(src: str, categories: list[Any], problems: list[str]) -> dict[int, str]:
    cats: dict[int, str] = {}
    for pos, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            problems.append(f"{src}: categories[{pos}]: no integer 'id'")
            continue
        if cat["id"] in cats:
            problems.append(f"{src}: category id {cat['id']}: duplicate category id")
            continue
        if not isinstance(cat.get("name"), str):
            problems.append(f"{src}: category id {cat['id']}: no 'name'")
        cats[cat["id"]] = str(cat.get("name"))
    return cats


def _check_annotation(
    src: str,
    ann: dict[str, Any],
    sizes: dict[Any, tuple[int, int] | None],
    cats: dict[int, str],
) -> list[str]:
    """Problems of one annotation (its id already checked)."""
    out: list[str] = []
    iid = ann.get("image_id")
    where = f"{src}: annotation id {ann['id']} (image id {iid!r})"
    if not _is_int(iid) or iid not in sizes:
        out.append(f"{where}: unknown image id {iid!r}")
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in cats:
        out.append(f"{where}: unknown category id {ann.get('category_id')!r}")
    if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd"), bool):
        out.append(f"{where}: iscrowd {ann.get('iscrowd')!r} is not 0 or 1")
    if not _is_number(ann.get("area")) or ann["area"] < 0:
        out.append(f"{where}: area {ann.get('area')!r} is not a finite number >= 0")
    box = ann.get("bbox")
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        out.append(f"{where}: bbox {box!r} is not 4 finite numbers")
        return out
    x, y, w, h = (float(v) for v in box)
    shown = [x, y, w, h]
    if w <= 0 or h <= 0:
        out.append(f"{where}: box {shown} has non-positive width or height")
    size = sizes.get(iid) if _is_int(iid) else None
    if size is not None:
        tol = BOX_TOLERANCE
        if x < -tol or y < -tol or x + w > size[0] + tol or y + h > size[1] + tol:
            out.append(f"{where}: box {shown} extends outside the {size[0]}x{size[1]} image")
    return out


def _check_files(
    src: str, images: list[Any], sizes: dict[Any, tuple[int, int] | None], image_dir: Path
) -> list[str]:
    """Problems with the image files: missing, unreadable, or of another size."""
    out: list[str] = []
    for img in images:
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
            continue
        path = image_dir / img["file_name"]
        where = f"{src}: image id {img.get('id')!r} ({img['file_name']})"
        if not path.is_file():
            out.append(f"{where}: file not found: {path}")
            continue
        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                actual = im.size
                im.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            out.append(f"{where}: unreadable image {path} ({type(exc).__name__}: {exc})")
            continue
        expected = sizes.get(img["id"]) if _is_int(img.get("id")) else None
        if expected is not None and actual != expected:
            out.append(
                f"{where}: image is {actual[0]}x{actual[1]} but the JSON says "
                f"{expected[0]}x{expected[1]}"
            )
    return out


def check_coco(
    ann_file: str | Path, image_dir: str | Path, *, check_images: bool = True
) -> dict[str, Any]:
    """Validate a COCO instances file (and its images); return a summary.

    Raises :class:`DatasetError` listing every problem found, one per line, each naming
    the file and the annotation / image id. With ``check_images=False`` the image files
    are not looked at (missing, unreadable, size).
    """
    path = Path(ann_file)
    src = str(ann_file)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{src}: top level is a {type(data).__name__}, not an object")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DatasetError(f"{src}: missing top-level key(s): {', '.join(missing)}")
    problems: list[str] = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            problems.append(f"{src}: '{key}' is a {type(data[key]).__name__}, not a list")
    if problems:
        raise problems_error(src, problems)
    sizes = _check_images(src, data["images"], problems)
    cats = _check_categories(src, data["categories"], problems)
    ann_ids: Counter[int] = Counter()
    num_crowd = 0
    for pos, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            problems.append(f"{src}: annotations[{pos}]: no integer 'id'")
            continue
        ann_ids[ann["id"]] += 1
        if ann_ids[ann["id"]] == 2:
            problems.append(
                f"{src}: annotation id {ann['id']} (image id {ann.get('image_id')!r}): "
                "duplicate annotation id"
            )
        problems.extend(_check_annotation(src, ann, sizes, cats))
        num_crowd += ann.get("iscrowd") == 1
    if check_images:
        problems.extend(_check_files(src, data["images"], sizes, Path(image_dir)))
    if problems:
        raise problems_error(src, problems)
    return {
        "ann_file": src,
        "image_dir": str(image_dir),
        "num_images": len(data["images"]),
        "num_annotations": len(data["annotations"]),
        "num_crowd": num_crowd,
        "num_categories": len(cats),
        "categories": [cats[c] for c in sorted(cats)],
        "images_checked": check_images,
    }


def load_coco(ann_file: str | Path) -> COCO:
    """A pycocotools ``COCO`` index of ``ann_file``, without its prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


class CocoDetection(torch.utils.data.Dataset):
    """COCO images and boxes in torchvision detection format.

    Labels are contiguous, 1..K in category id order (0 is the background). Crowd
    annotations are left out of the targets.
    """

    def __init__(
        self, ann_file: str | Path, image_dir: str | Path, transforms: Transform | None = None
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.coco = load_coco(self.ann_file)
        self.ids: list[int] = sorted(self.coco.imgs)
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.num_classes = len(self.cat_ids)
        self.class_names: list[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        """Image ``image_id`` as float32 RGB [3, H, W] in [0, 1]."""
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0).contiguous()

    def load_target(self, image_id: int) -> Target:
        """Non-crowd boxes (xyxy), labels, areas of ``image_id``."""
        anns = [
            a
            for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
            if not a.get("iscrowd", 0)
        ]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return {
            "boxes": boxes,
            "labels": torch.tensor(
                [self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "image_id": int(image_id),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.ids[index]
        image, target = self.load_image(image_id), self.load_target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[tuple[Any, ...], ...]:
    """Batch as (images, targets) tuples, torchvision detection style."""
    return tuple(zip(*batch, strict=True))
