"""A deterministic synthetic COCO detection dataset of filled geometric shapes.

Each image has a coloured, textured background (random gradient, low-frequency texture,
faint lines and blotches, gaussian noise) with 2-6 filled shapes on it. The class of a
shape is decided by its geometry only; its colour is random, chosen to contrast with
the pixels around it. Every split holds small, medium and large objects (COCO size
ranges by box area; large ones need ``image_size >= LARGE_MIN_IMAGE``) and every class,
by construction.

The same ``seed`` and parameters give byte-identical files.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from detprune.utils.io import atomic_path, write_json

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "plus", "ring", "star")
"""Shape class names; category id = index + 1."""

SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
Plan = list[tuple[int, str, int]]  # (class index, size range, forced) of each object
_FOR_CLASS, _FOR_SIZE = 1, 2  # why an object is forced: to show its class / its size range
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}  # each split draws from its own seed
_SUPERSAMPLE = 4
_MAX_IOU = 0.3
_MIN_VISIBLE = 0.7
_MIN_CONTRAST = 80.0
LARGE_MIN_IMAGE = 112
"""Smallest image size that holds large objects (box area > 96^2); smaller has none."""
MIN_IMAGE = 48
_P_LARGE = 0.5  # chance that an image holds one large object
_P_SMALL = 0.4  # chance that any other object is small (else medium)
_PNG_COMPRESS = 1
_FILE_RE = re.compile(r"^\d{6}\.png$")


def size_range(area: float) -> str:
    """COCO size range of a box area: "small" (< 32^2), "medium" or "large" (> 96^2)."""
    if area < 32**2:
        return "small"
    return "medium" if area <= 96**2 else "large"


# Target longest box side, and the box-area bounds a rendered shape must meet, per range.
# The bounds keep clear of the COCO thresholds so that no object sits on a boundary.
def _size_spec(size: str, image_size: int) -> tuple[float, float, float, float]:
    if size == "small":
        return 12.0, 28.0, 0.0, 900.0
    if size == "medium":
        return 38.0, min(88.0, image_size - 4.0), 1200.0, 8400.0
    return 104.0, float(image_size - 4), 9800.0, math.inf


def _unit_polygon(kind: str, angle: float) -> np.ndarray:
    """Vertices (n, 2) of a polygonal shape of radius about 1, rotated by ``angle`` rad."""
    if kind == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    elif kind == "triangle":
        t = np.deg2rad(-90 + 120 * np.arange(3))
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif kind == "plus":  # one arm's outline, turned four times by 90 degrees
        arm = np.array([[-0.34, -1.0], [0.34, -1.0], [0.34, -0.34]])
        turn = np.array([[0.0, 1.0], [-1.0, 0.0]])
        pts = np.concatenate([arm @ np.linalg.matrix_power(turn, k) for k in range(4)])
    elif kind == "star":
        t = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    else:
        raise ValueError(f"not a polygon shape: {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def render_shape(kind: str, longest: float, angle: float, frac: np.ndarray) -> np.ndarray | None:
    """Anti-aliased alpha patch in [0, 1], cropped to its non-zero pixels."""
    if kind in ("circle", "ring"):
        pts = np.array([[-1.0, -1.0], [1.0, 1.0]])
    else:
        pts = _unit_polygon(kind, angle)
    lo = pts.min(axis=0)
    scale = longest / float((pts.max(axis=0) - lo).max())
    xy = (pts - lo) * scale + 1.0 + frac  # patch pixel coordinates
    w, h = (int(math.ceil(v)) + 3 for v in (pts.max(axis=0) - lo) * scale)
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    big = xy * ss
    if kind in ("circle", "ring"):
        draw.ellipse([float(v) for v in big.ravel()], fill=255)
        if kind == "ring":
            centre, radius = big.mean(axis=0), (big[1, 0] - big[0, 0]) / 2 * 0.5
            inner = np.concatenate([centre - radius, centre + radius])
            draw.ellipse([float(v) for v in inner], fill=0)
    else:
        draw.polygon([(float(x), float(y)) for x, y in big], fill=255)
    alpha = np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0
    ys, xs = np.nonzero(alpha > 0)
    if ys.size == 0:
        return None
    return alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


@dataclass
class _Placed:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the drawn pixels
    pixels: int  # drawn pixels when placed
    visible: int  # pixels not covered by later shapes


def _max_iou(boxes: np.ndarray, placed: list[_Placed]) -> np.ndarray:
    """Largest IoU of each candidate box (n, 4) with any placed box; 0 if none placed."""
    if not placed:
        return np.zeros(len(boxes))
    b = np.array([p.box for p in placed], dtype=np.float64)[None]  # (1, m, 4)
    a = boxes.astype(np.float64)[:, None]  # (n, 1, 4)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return (inter / (area_a + area_b - inter)).max(axis=1)


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _keeps_visible(
    owner: np.ndarray, placed: list[_Placed], mask: np.ndarray, x: int, y: int
) -> bool:
    """Whether a shape drawn on top at (x, y) keeps every earlier shape recognisable.

    Each earlier shape must keep most of its pixels and its box: a pixel on each of the
    four sides of its box stays visible.
    """
    h, w = mask.shape
    under = owner[y : y + h, x : x + w][mask]
    if under.max() < 0:
        return True
    lost = np.bincount(under[under >= 0])
    cover = np.zeros(owner.shape, dtype=bool)
    cover[y : y + h, x : x + w] = mask
    for j in np.nonzero(lost)[0]:
        p = placed[int(j)]
        if p.visible - lost[j] < _MIN_VISIBLE * p.pixels:
            return False
        x0, y0, x1, y1 = p.box
        sides = (
            (slice(y0, y0 + 1), slice(x0, x1)),
            (slice(y1 - 1, y1), slice(x0, x1)),
            (slice(y0, y1), slice(x0, x0 + 1)),
            (slice(y0, y1), slice(x1 - 1, x1)),
        )
        for rows, cols in sides:
            if not ((owner[rows, cols] == j) & ~cover[rows, cols]).any():
                return False
    return True


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float RGB image (size, size, 3): gradient, texture, faint lines and blotches."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = ramp[None, :] * math.cos(theta) + ramp[:, None] * math.sin(theta)
    t = (t - t.min()) / (t.max() - t.min())
    coarse = rng.normal(0.0, 1.0, size=(6, 6)).astype(np.float32)
    tex = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))
    img = c0 + t[..., None] * (c1 - c0) + np.float32(rng.uniform(4, 12)) * tex[..., None]
    for _ in range(int(rng.integers(1, 5))):
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        if rng.random() < 0.5:
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, size=4))
            draw.line([(x0, y0), (x1, y1)], fill=255, width=int(rng.integers(1, 3)))
            a = rng.uniform(0.12, 0.25)
        else:
            cx, cy = rng.uniform(0, size, size=2)
            rx, ry = rng.uniform(6, size / 4, size=2)
            draw.ellipse([float(cx - rx), float(cy - ry), float(cx + rx), float(cy + ry)], 255)
            a = rng.uniform(0.08, 0.18)
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        box = layer.getbbox()
        if box is None:
            continue
        win = np.s_[box[1] : box[3], box[0] : box[2]]
        alpha = np.asarray(layer.crop(box), dtype=np.float32)[..., None] * np.float32(a / 255)
        img[win] = img[win] * (1 - alpha) + colour * alpha
    return img


def pick_colour(rng: np.random.Generator, local: np.ndarray) -> np.ndarray:
    """A random colour far (RGB distance) from at least 95% of the ``local`` pixels."""
    pix = local.reshape(-1, 3).astype(np.float32)
    pix = pix[:: max(1, pix.shape[0] // 400)]  # a subsample is enough for a percentile
    cands = rng.uniform(0, 255, size=(64, 3)).astype(np.float32)
    dist = np.sqrt(((pix[None, :, :] - cands[:, None, :]) ** 2).sum(-1))  # (64, n)
    k = dist.shape[1] // 20
    score = np.partition(dist, k, axis=1)[:, k]
    ok = np.nonzero(score >= _MIN_CONTRAST)[0]
    return cands[ok[0]] if ok.size else cands[int(np.argmax(score))]


def _find_place(
    rng: np.random.Generator,
    owner: np.ndarray,
    placed: list[_Placed],
    kind: str,
    size_name: str,
    renders: int,
) -> tuple[np.ndarray, int, int, tuple[int, int, int, int]] | None:
    """Render ``kind`` in range ``size_name`` and find a free spot: (alpha, x, y, box)."""
    size = owner.shape[0]
    lo, hi, amin, amax = _size_spec(size_name, size)
    for attempt in range(renders):
        top = hi - (hi - lo) * attempt / renders  # try smaller shapes as attempts go on
        if kind in ("square", "plus"):
            angle = math.radians(rng.uniform(-15, 15))
        else:
            angle = rng.uniform(0, 2 * math.pi)
        alpha = render_shape(kind, rng.uniform(lo, top), angle, rng.uniform(0, 1, size=2))
        if alpha is None or max(alpha.shape) > size:
            continue
        mask = alpha >= 0.5
        mbox = _mask_box(mask)
        if mbox is None:
            continue
        bw, bh = mbox[2] - mbox[0], mbox[3] - mbox[1]
        if not (amin <= bw * bh <= amax) or min(bw, bh) < 10:
            continue
        ph, pw = alpha.shape
        xy = rng.integers(0, [size - pw + 1, size - ph + 1], size=(25, 2))
        boxes = np.concatenate([xy + mbox[:2], xy + mbox[2:]], axis=1)
        for i in np.nonzero(_max_iou(boxes, placed) <= _MAX_IOU)[0]:
            x, y = int(xy[i, 0]), int(xy[i, 1])
            if _keeps_visible(owner, placed, mask, x, y):
                return alpha, x, y, (x + mbox[0], y + mbox[1], x + mbox[2], y + mbox[3])
    return None


def _draw_image(
    rng: np.random.Generator, size: int, plan: Plan
) -> tuple[np.ndarray, list[dict[str, Any]], Plan]:
    """Draw one image from ``plan``, largest objects first.

    Returns the pixels, the placed objects and the forced objects that found no place
    (the caller moves them to the next image); one forced for its class is tried as a
    small object before that. Other objects without a place are left out.
    """
    img = background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)
    placed: list[_Placed] = []
    objects: list[dict[str, Any]] = []
    missed: Plan = []
    order = sorted(plan, key=lambda it: (-SIZE_NAMES.index(it[1]), not it[2]))
    for cls, size_name, forced in order:
        found = _find_place(rng, owner, placed, CLASSES[cls], size_name, 120 if forced else 40)
        if found is None and forced == _FOR_CLASS and size_name != "small":
            size_name = "small"
            found = _find_place(rng, owner, placed, CLASSES[cls], size_name, 120)
        if found is None:
            if forced:
                missed.append((cls, size_name, forced))
            continue
        alpha, x, y, box = found
        ph, pw = alpha.shape
        colour = pick_colour(rng, img[max(y - 2, 0) : y + ph + 2, max(x - 2, 0) : x + pw + 2])
        a = alpha[..., None]
        img[y : y + ph, x : x + pw] = img[y : y + ph, x : x + pw] * (1 - a) + colour * a
        mask = alpha >= 0.5
        window = owner[y : y + ph, x : x + pw]
        under = window[mask]
        for j, n in enumerate(np.bincount(under[under >= 0], minlength=len(placed))):
            placed[j].visible -= int(n)
        window[mask] = len(placed)
        placed.append(_Placed(box, int(mask.sum()), int(mask.sum())))
        objects.append({"class": cls, "box": box})
    img += np.float32(rng.uniform(2.0, 7.0)) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects, missed


def _plan_split(
    rng: np.random.Generator, num_images: int, min_objects: int, max_objects: int, large: bool
) -> list[Plan]:
    """Per image: (class index, size range, forced) of each object.

    Image 0 gets one large (if ``large``), one medium and one small object, and the first
    len(CLASSES) objects of the split take every class once: these are "forced", tried
    harder to place and moved to the next image if they find no place.
    """
    k = len(CLASSES)
    counts = rng.integers(min_objects, max_objects + 1, size=num_images)
    if num_images:
        counts[0] = max(int(counts[0]), 3)
    total = int(counts.sum())
    classes = rng.integers(0, k, size=total)
    n_forced = min(k, total)
    classes[:n_forced] = rng.permutation(k)[:n_forced]
    plans: list[Plan] = []
    start = 0
    for i, n in enumerate(int(c) for c in counts):
        sizes = ["small" if rng.random() < _P_SMALL else "medium" for _ in range(n)]
        if i == 0:
            sizes[:3] = ["large" if large else "medium", "medium", "small"]
        elif rng.random() < _P_LARGE and large:
            sizes[0] = "large"
        forced = [
            _FOR_SIZE if i == 0 and j < 3 else _FOR_CLASS if start + j < n_forced else 0
            for j in range(n)
        ]
        plans.append([(int(classes[start + j]), sizes[j], forced[j]) for j in range(n)])
        start += n
    return plans


def save_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=_PNG_COMPRESS)


def _write_split(out_dir: Path, split: str, num_images: int, params: dict[str, Any]) -> dict:
    """Write one split's PNGs and JSON; return its counts."""
    seed, image_size = params["seed"], params["image_size"]
    split_seed = [seed, _SPLIT_CODES[split]]
    rng = np.random.default_rng(split_seed)
    large = image_size >= LARGE_MIN_IMAGE
    plans = _plan_split(rng, num_images, params["min_objects"], params["max_objects"], large)
    img_dir = out_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    names: set[str] = set()
    writes: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=2) as pool:  # PNG encoding overlaps the drawing
        missed: Plan = []
        for idx, plan in enumerate(plans):
            pixels, objects, missed = _draw_image(rng, image_size, missed + plan)
            name = f"{idx:06d}.png"
            names.add(name)
            writes.append(pool.submit(save_png, img_dir / name, pixels))
            images.append(
                {"id": idx + 1, "file_name": name, "width": image_size, "height": image_size}
            )
            for obj in objects:
                x0, y0, x1, y1 = (float(v) for v in obj["box"])
                ann = {"id": len(anns) + 1, "image_id": idx + 1, "iscrowd": 0}
                ann.update(category_id=obj["class"] + 1, bbox=[x0, y0, x1 - x0, y1 - y0])
                anns.append({**ann, "area": (x1 - x0) * (y1 - y0)})
    for done in writes:
        done.result()  # re-raise a failed write
    for stale in img_dir.iterdir():  # images left over from an earlier, larger run
        if _FILE_RE.match(stale.name) and stale.name not in names:
            stale.unlink()
    per_class = {name: 0 for name in CLASSES}
    per_size = {name: 0 for name in SIZE_NAMES}
    for ann in anns:
        per_class[CLASSES[ann["category_id"] - 1]] += 1
        per_size[size_range(ann["area"])] += 1
    if num_images and (per_size["small"] * per_size["medium"] == 0 or large > per_size["large"]):
        raise RuntimeError(f"synthetic {split} split lacks a size range: {per_size}")
    if sum(len(p) for p in plans) >= len(CLASSES) and min(per_class.values()) == 0:
        raise RuntimeError(f"synthetic {split} split lacks a class: {per_class}")
    coco = {
        "info": {
            "description": "detprune synthetic shapes",
            "generator": "detprune.data.synth.write_synthetic",
            "version": 1,
            "split": split,
            "split_seed": split_seed,
            **params,
        },
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)
        ],
    }
    write_json(out_dir / f"instances_{split}.json", coco)
    counts = {"images": len(images), "annotations": len(anns)}
    return {**counts, "per_class": per_class, "per_size": per_size}


def write_synthetic(
    out_dir: Path,
    *,
    seed: int = 0,
    num_train: int = 600,
    num_val: int = 150,
    num_test: int = 0,
    image_size: int = 128,
    min_objects: int = 2,
    max_objects: int = 6,
) -> dict[str, Any]:
    """Write the synthetic dataset under ``out_dir``; return counts per split.

    Files: ``instances_{train,val,test}.json`` and ``{train,val,test}/NNNNNN.png`` (the
    JSON's ``file_name`` is relative to the split folder). Each split is drawn from its own
    seed ``[seed, split code]`` by the same generator: ``val`` is for choices (schedules,
    sweeps), ``test`` the held-out split results are reported on. Images of an earlier run
    beyond the new counts are removed. ``image_size`` must be at least 48 and
    ``max_objects`` at least 3; below ``LARGE_MIN_IMAGE`` (112) pixels there are no large
    objects (box area > 96^2).
    An object that finds no place is left out, except the few that guarantee every class
    and size range: they move to the next image (which may then exceed ``max_objects``).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if min(num_train, num_val, num_test) < 0:
        raise ValueError(f"image counts must be >= 0, got {num_train}, {num_val} and {num_test}")
    if image_size < MIN_IMAGE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE}, got {image_size}")
    if not 1 <= min_objects <= max_objects or max_objects < 3:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects and max_objects >= 3, "
            f"got {min_objects} and {max_objects}"
        )
    out_dir = Path(out_dir)
    params = dict(seed=seed, num_train=num_train, num_val=num_val, num_test=num_test)
    params.update(image_size=image_size)
    params.update(min_objects=min_objects, max_objects=max_objects)
    summary: dict[str, Any] = {"classes": list(CLASSES), **params}
    for split, n in (("train", num_train), ("val", num_val), ("test", num_test)):
        summary[split] = _write_split(out_dir, split, n, params)
    return summary
