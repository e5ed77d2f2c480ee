"""Image classification data: a deterministic synthetic ImageFolder set, a checker that
names every problem, an ImageFolder dataset and its training transforms.

Layout (torchvision's ImageFolder): ``<root>/<class name>/<image file>``; classes are the
sub-folders in sorted order, label ``c`` (0..K-1) is the c-th of them. The pipeline passes
a split's root as both its "ann" and "images" path.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from detprune.data.coco import DatasetError, problems_error
from detprune.data.synth import background, pick_colour, render_shape, save_png
from detprune.data.transforms import Compose, RandomHorizontalFlip, Target, Transform

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
"""File endings (case-insensitive) read as images; other files are ignored."""

CLASSES: tuple[str, ...] = (
    "checker",
    "circle",
    "dots",
    "hstripes",
    "plus",
    "ring",
    "square",
    "star",
    "triangle",
    "vstripes",
)
"""Synthetic class names, in sorted order so that ImageFolder's label c (the c-th sorted
folder) is ``CLASSES[c]``: six large shapes and four full-image textures."""
TEXTURES = frozenset({"checker", "dots", "hstripes", "vstripes"})
_SPLIT_CODES = {"train": 11, "val": 12, "test": 13}
MIN_IMAGE = 32


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- synthetic


def _texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Coverage in [0, 1] (size, size) of one of the texture classes."""
    period = rng.uniform(size / 9, size / 5)
    phase = rng.uniform(0, period)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "hstripes":
        return ((yy + phase) % period < period / 2).astype(np.float32)
    if kind == "vstripes":
        return ((xx + phase) % period < period / 2).astype(np.float32)
    if kind == "checker":
        cx = ((xx + phase) // (period / 2)).astype(int)
        cy = ((yy + rng.uniform(0, period)) // (period / 2)).astype(int)
        return ((cx + cy) % 2).astype(np.float32)
    if kind == "dots":
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        r = period * rng.uniform(0.15, 0.22)
        for cy in np.arange(phase - period, size + period, period):
            for cx in np.arange(phase - period, size + period, period):
                jx, jy = rng.uniform(-0.1, 0.1, size=2) * period
                draw.ellipse([cx + jx - r, cy + jy - r, cx + jx + r, cy + jy + r], fill=255)
        return np.asarray(layer, dtype=np.float32) / 255.0
    raise ValueError(f"not a texture class: {kind!r}")


def _draw(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """One image of class ``cls``: a noisy textured background with a large shape on it,
    or covered by a texture; uint8 RGB (size, size, 3)."""
    img = background(rng, size)
    kind = CLASSES[cls]
    if kind not in TEXTURES:
        alpha = None
        while alpha is None or max(alpha.shape) > size - 2:
            if kind in ("square", "plus"):
                angle = math.radians(rng.uniform(-15, 15))
            else:
                angle = rng.uniform(0, 2 * math.pi)
            longest = rng.uniform(0.45, 0.8) * size
            alpha = render_shape(kind, longest, angle, rng.uniform(0, 1, size=2))
        ph, pw = alpha.shape
        y, x = (int(v) for v in rng.integers(0, [size - ph + 1, size - pw + 1]))
        colour = pick_colour(rng, img[y : y + ph, x : x + pw])
        a = alpha[..., None]
        img[y : y + ph, x : x + pw] = img[y : y + ph, x : x + pw] * (1 - a) + colour * a
    else:
        cover = _texture(rng, kind, size)[..., None]
        colour = pick_colour(rng, img)
        strength = np.float32(rng.uniform(0.6, 0.85))
        img = img * (1 - strength * cover) + colour * (strength * cover)
    img += np.float32(rng.uniform(2.0, 7.0)) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_split(root: Path, split: str, n: int, params: dict[str, Any]) -> dict[str, int]:
    k = params["num_classes"]
    rng = np.random.default_rng([params["seed"], _SPLIT_CODES[split]])
    labels = rng.permutation(np.arange(n) % k)  # balanced: counts differ by at most one
    split_dir = root / split
    names = CLASSES[:k]
    wanted: set[Path] = set()
    writes: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=2) as pool:  # PNG encoding overlaps the drawing
        for idx, label in enumerate(int(c) for c in labels):
            path = split_dir / names[label] / f"{idx:06d}.png"
            wanted.add(path)
            writes.append(pool.submit(save_png, path, _draw(rng, label, params["image_size"])))
    for done in writes:
        done.result()  # re-raise a failed write
    for stale in sorted(split_dir.glob("*/*.png")):  # left over from an earlier run
        if stale not in wanted:
            stale.unlink()
    for folder in sorted(split_dir.iterdir()):
        if folder.is_dir() and folder.name not in names and not any(folder.iterdir()):
            folder.rmdir()
    return {name: int((labels == c).sum()) for c, name in enumerate(names)}


def synthetic_arrays(
    split: str, num: int, image_size: int = 64, num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The ``split`` of the synthetic classification set in memory: uint8 images
    (num, size, size, 3) and int64 labels (num,), balanced over ``num_classes`` classes
    (the first of :data:`CLASSES`). The same draws as the ImageFolder files
    :func:`write_synthetic_classification` writes for these parameters; byte-identical
    for a seed (the backbone pretraining stage's set)."""
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(CLASSES)}, got {num_classes}")
    if image_size < MIN_IMAGE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE}, got {image_size}")
    rng = np.random.default_rng([seed, _SPLIT_CODES[split]])
    labels = rng.permutation(np.arange(num) % num_classes)
    images = np.zeros((num, image_size, image_size, 3), np.uint8)
    for i, c in enumerate(labels):
        images[i] = _draw(rng, int(c), image_size)
    return images, labels.astype(np.int64)


def write_synthetic_classification(
    out_dir: str | Path,
    num_train: int = 600,
    num_val: int = 200,
    num_test: int = 0,
    image_size: int = 64,
    num_classes: int = 6,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``out_dir/{train,val,test}/<class>/NNNNNN.png``; return the images per class.

    ``test`` (written when ``num_test`` > 0) is the held-out split results are reported
    on; ``val`` is for choices. Each split draws from its own seed.

    Class ``c`` is ``CLASSES[c]`` (sorted names; the first ``num_classes`` are used): a
    filled shape (circle, plus, ring, square, star, triangle) covering 45-80% of the image
    width, or a full-image texture (checker, dots, horizontal or vertical stripes) of
    random period and phase; colours are random
    (contrasting with the background), on the detection set's noisy, textured
    backgrounds. Classes are balanced within a split (counts differ by at most one) and
    every class appears in both splits. The same arguments give byte-identical files;
    images of an earlier run that the new counts do not produce are removed.
    """
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(CLASSES)}, got {num_classes}")
    if num_train < num_classes or num_val < num_classes:
        raise ValueError(
            f"every class needs an image in each split: num_train ({num_train}) and "
            f"num_val ({num_val}) must be >= num_classes ({num_classes})"
        )
    if 0 < num_test < num_classes:
        raise ValueError(
            f"every class needs an image in the test split: num_test ({num_test}) must be "
            f"0 or >= num_classes ({num_classes})"
        )
    if image_size < MIN_IMAGE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE}, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root = Path(out_dir)
    params = {"image_size": image_size, "num_classes": num_classes, "seed": seed}
    summary: dict[str, Any] = {"classes": list(CLASSES[:num_classes]), **params}
    splits = (("train", num_train), ("val", num_val), ("test", num_test))
    for split, n in (s for s in splits if s[1]):
        summary[split] = _write_split(root, split, n, params)
    return summary


# --------------------------------------------------------------------------- checks


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_imagefolder(root: str | Path, *, check_images: bool = True) -> dict[str, Any]:
    """Validate an ImageFolder tree; return a summary.

    Raises :class:`~detprune.data.coco.DatasetError` (a ValueError) listing every problem,
    one per line, each naming the folder or file: no class folders, a class folder
    without images, images outside the class folders, unreadable images. With
    ``check_images=False`` the image files are not opened.
    """
    src = str(root)
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"{src}: not a directory (expected an ImageFolder <root>/<class>/)")
    classes = _class_dirs(path)
    if not classes:
        raise DatasetError(f"{src}: no class folders (expected <root>/<class name>/<image>)")
    problems: list[str] = []
    loose = sorted(p.name for p in path.iterdir() if _is_image(p))
    if loose:
        problems.append(f"{src}: {len(loose)} image(s) outside the class folders, e.g. {loose[0]}")
    per_class: dict[str, int] = {}
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if _is_image(p))
        per_class[folder.name] = len(files)
        if not files:
            problems.append(f"{src}: class folder {folder}: empty (no image files)")
        if not check_images:
            continue
        for file in files:
            try:
                with Image.open(file) as im:
                    im.verify()
                with Image.open(file) as im:
                    im.load()
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
                problems.append(f"{src}: unreadable image {file} ({type(exc).__name__}: {exc})")
    if problems:
        raise problems_error(src, problems)
    return {
        "root": src,
        "num_images": sum(per_class.values()),
        "num_classes": len(classes),
        "classes": [p.name for p in classes],
        "per_class": per_class,
        "images_checked": check_images,
    }


# --------------------------------------------------------------------------- dataset


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of ``root/<class>/`` with targets ``{"labels": tensor([c]), "image_id": i}``.

    Like :class:`~detprune.data.coco.CocoDetection`: images are float32 RGB [3, H, W] in
    [0, 1], ``transforms(image, target)`` is applied when given, and ``num_classes``,
    ``class_names`` and ``ids`` describe the set. Labels are 0..K-1 (sorted folder names).
    """

    def __init__(self, root: str | Path, transforms: Transform | None = None) -> None:
        self.root = Path(root)
        self.transforms = transforms
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a directory (expected an ImageFolder)")
        classes = _class_dirs(self.root)
        if not classes:
            raise DatasetError(f"{self.root}: no class folders")
        self.class_names: list[str] = [p.name for p in classes]
        self.num_classes = len(classes)
        self.samples: list[tuple[Path, int]] = [
            (f, c)
            for c, folder in enumerate(classes)
            for f in sorted(folder.iterdir())
            if _is_image(f)
        ]
        self.ids: list[int] = list(range(len(self.samples)))

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        """Image ``index`` as float32 RGB [3, H, W] in [0, 1]."""
        with Image.open(self.samples[index][0]) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image = self.load_image(index)
        target: Target = {
            "labels": torch.tensor([self.samples[index][1]], dtype=torch.int64),
            "image_id": int(index),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# --------------------------------------------------------------------------- transforms


class RandomResizedCrop:
    """A random crop of ``scale`` of the area and aspect ``ratio`` (torchvision's
    RandomResizedCrop sampling, 10 tries then the centre crop); the resize to the input
    size is the model's. Draws from torch's global generator, like the detection presets."""

    def __init__(
        self,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)))
                left = int(torch.randint(0, width - w + 1, (1,)))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        top, left, h, w = self.box(*image.shape[-2:])
        return image[:, top : top + h, left : left + w], target

    def __repr__(self) -> str:
        return f"RandomResizedCrop(scale={self.scale}, ratio={self.ratio})"


class CenterCrop:
    """The centre square of side ``ratio`` x the shorter side (torchvision's evaluation
    resize to S / ratio, then centre crop S, before the model's resize to S)."""

    def __init__(self, ratio: float = 1.0) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"centre crop ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        h, w = image.shape[-2:]
        side = max(1, int(round(self.ratio * min(h, w))))
        if (side, side) == (h, w):
            return image, target
        top, left = (h - side) // 2, (w - side) // 2
        return image[:, top : top + side, left : left + side], target

    def __repr__(self) -> str:
        return f"CenterCrop(ratio={self.ratio})"


def classification_transform(
    preset: str,
    train: bool,
    scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: float = 1.0,
) -> Transform:
    """A classifier's data transform (the model then resizes to its input size).

    Training with ``hflip``: torchvision's ImageNet training preset, a random-resized crop
    of ``scale`` of the area, then a horizontal flip with probability 0.5. Evaluation
    (``train=False``) and training with ``none`` (e.g. the pruning stage's batches): the
    centre square of ``crop_ratio`` of the shorter side (the whole of a square image at 1).
    """
    if preset not in ("none", "hflip"):
        raise ValueError(f"unknown augmentation preset {preset!r}; known presets: hflip, none")
    if not train or preset == "none":
        return CenterCrop(crop_ratio)
    return Compose(
        [RandomResizedCrop((float(scale[0]), float(scale[1]))), RandomHorizontalFlip(0.5)]
    )
