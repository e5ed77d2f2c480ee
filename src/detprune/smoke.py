"""Smoke mode of the paper profile: every job of a paper table, cut to seconds on a CPU.

``--config table=<t> profile=paper smoke=true`` plans exactly the jobs of the paper run
(same models, methods, rules and code paths, the distilled fine-tuning too), then cuts
their work with :func:`overlay`: every schedule to one epoch of two iterations of two
images, the pruning budgets (calibration batches, progressive steps, DCP/LCP's selection
batches and iterations) to their minimum, a small input size (``model.kwargs``
``image_size``/``max_size``; widths, blocks and backbone are the paper's), the CPU,
two threads. AMP is a CUDA path: smoke mode does not cover it (``amp: false``).

Its results live under ``<results>/smoke`` (never mixed with real results), and unless
the dataset roots are given its data is a fixture the workflow writes itself
(:func:`write_fixture`, rules ``smoke_*``): COCO 2017, VOC07+12 (COCO JSON) and an
ImageNet ImageFolder, laid out as the paper profile reads them, a few images each.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from detprune.config import ConfigError, model_catalog
from detprune.utils.io import write_json

#: Training iterations per epoch, images per batch, of every schedule.
ITERS, BATCH = 2, 2
#: Input size of the detectors and of the classifiers (``model.kwargs.image_size``).
DET_SIZE, CLS_SIZE = 128, 64
#: Models whose architecture fixes their input size: SSD300's extra layers shrink its
#: features to 1x1 at 300 px (at 128 px a 3x3 extra layer meets a 2x2 map).
FIXED_SIZE: dict[str, int] = {"ssd300_r50": 300}
#: Images of each fixture split (train; val / test); the COCO tune split carved from train.
TRAIN_IMAGES, VAL_IMAGES, TUNE_IMAGES = 8, 4, 2
#: Budget options of each pruning procedure, cut to their minimum (where declared).
BUDGETS: dict[str, Any] = {
    "calib_batches": 1,
    # progressive (GroupFisher, MIEP): a few steps of one iteration each
    "steps": 2,
    "interval": 1,
    # stage-wise (DCP, LCP): one batch, one greedy round, one SGD step
    "batches": 1,
    "aux_batches": 1,
    "aux_iters": 1,
    "select_steps": 1,
    "sgd_iters": 1,
}

# COCO's 80 category ids (with the gaps of the 91-id numbering) and names.
COCO_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip
COCO_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip
#: The fixture's shapes become these categories (first, last and ids beside the gaps).
COCO_USED: tuple[int, ...] = (1, 13, 27, 46, 67, 90)
VOC_USED: tuple[int, ...] = (1, 5, 9, 13, 17, 20)
IMAGENET_CLASSES = 1000


def flag(config: Mapping[str, Any]) -> bool:
    """``smoke`` as a boolean (``--config smoke=true`` gives Snakemake the string)."""
    value = config.get("smoke", False)
    if value in (True, "true"):
        return True
    if value in (False, "false", None):
        return False
    raise ConfigError(f"config field 'smoke': {value!r} is not a boolean")


def check(config: Mapping[str, Any]) -> bool:
    """Whether the run is a smoke run; ``smoke`` only with ``profile: paper``."""
    if not flag(config):
        return False
    if config.get("profile") != "paper":
        raise ConfigError("config field 'smoke': only with table=<name> profile=paper")
    return True


def results_root(results: str) -> str:
    """Where a smoke run writes: its own folder, beside no real result."""
    return f"{results.rstrip('/')}/smoke"


def fixture_roots(results: str) -> dict[str, str]:
    """The dataset roots of the fixture under a smoke run's results folder."""
    return {
        k: f"{results}/data/{k[: -len('_root')]}"
        for k in ("coco_root", "voc_root", "imagenet_root")
    }


def _schedule(sched: dict[str, Any], full: bool) -> None:
    sched.update(max_iters_per_epoch=ITERS, device="cpu", amp=False)
    if full or "epochs" in sched:
        sched["epochs"] = 1
    if full or "batch_size" in sched:
        sched["batch_size"] = BATCH
    if sched.get("warmup_iters"):
        sched["warmup_iters"] = 1


def overlay(cfg: Mapping[str, Any], methods: Iterable[str]) -> dict[str, Any]:
    """``cfg`` (an experiment of the paper profile) with its work cut for a smoke run;
    ``methods`` are the pruning methods its jobs run (their budget options are cut)."""
    from detprune.pruning.methods import get_method, options_of

    out = copy.deepcopy(dict(cfg))
    out["smoke"] = True
    out["threads"] = 2
    _schedule(out["train"], True)
    _schedule(out["sparse"]["schedule"], True)
    _schedule(out["finetune"]["default"], True)
    for sched in out["finetune"].get("methods", {}).values():
        _schedule(sched, False)
    if "pretrain" in out:
        out["pretrain"].update(epochs=1, batch_size=BATCH, num_train=4, num_val=2, image_size=32)
    prune = out["prune"]
    prune["calib_batches"] = BUDGETS["calib_batches"]
    options = prune.setdefault("options", {})
    for m in sorted(set(methods)):
        declared = options_of(get_method(m))
        cut = {k: v for k, v in BUDGETS.items() if k in declared}
        options[m] = {**options.get(m, {}), **cut}
    out["evaluate"]["batch_size"] = BATCH
    out["evaluate"]["latency"].update(runs=1, warmup=0, rounds=1)
    name = out["model"]["name"]
    entry = model_catalog()[name]
    size = CLS_SIZE if entry["task"] == "classification" else DET_SIZE
    size = FIXED_SIZE.get(name, size)
    kwargs = dict(out["model"].get("kwargs") or {})
    kwargs.update({k: size for k in ("image_size", "max_size") if k in entry["kwargs"]})
    out["model"]["kwargs"] = kwargs
    coco = out["data"].get("coco")
    if coco and coco.get("tune_images"):
        coco["tune_images"] = TUNE_IMAGES
    return out


# --- the fixture -------------------------------------------------------------------------


def _to_jpeg(src: Path, dest: Path) -> None:
    from PIL import Image

    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").save(dest, format="JPEG", quality=90)


def _detection(
    root: Path, splits: Mapping[str, tuple[str, str, str]], ids: Iterable[int],
    used: tuple[int, ...], names: Iterable[str], seed: int,
) -> None:  # fmt: skip
    """Synthetic shapes as a COCO-format set: ``splits[split] = (json, image folder, file
    prefix)``, the shapes relabelled to ``used`` among categories ``ids``/``names``."""
    import json
    import tempfile

    from detprune.data.synth import write_synthetic

    categories = [
        {"id": i, "name": n, "supercategory": "thing"} for i, n in zip(ids, names, strict=True)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(
            Path(tmp), seed=seed, num_train=TRAIN_IMAGES, num_val=VAL_IMAGES, num_test=0,
            image_size=DET_SIZE, min_objects=1, max_objects=3,
        )  # fmt: skip
        for split, (ann, folder, prefix) in splits.items():
            data = json.loads((Path(tmp) / f"instances_{split}.json").read_text())
            for img in data["images"]:
                name = f"{prefix}{img['id']:012d}.jpg"
                _to_jpeg(Path(tmp) / split / img["file_name"], root / folder / name)
                img["file_name"] = name
            for a in data["annotations"]:
                a["category_id"] = used[a["category_id"] - 1]
            data["categories"] = categories
            data.pop("info", None)
            write_json(root / ann, data)


def write_coco(root: str | Path) -> None:
    """COCO 2017's layout: annotations/instances_{train,val}2017.json, train2017/,
    val2017/; COCO's 80 category ids with their gaps."""
    splits = {
        "train": ("annotations/instances_train2017.json", "train2017", ""),
        "val": ("annotations/instances_val2017.json", "val2017", ""),
    }
    _detection(Path(root), splits, COCO_IDS, COCO_USED, COCO_NAMES, seed=1)


def write_voc(root: str | Path) -> None:
    """VOC07+12 as `detprune data voc2coco` writes it: voc0712_trainval.json,
    voc07_test.json, both over JPEGImages/; VOC's 20 classes (ids 1..20)."""
    from detprune.data.voc import VOC_CLASSES

    splits = {
        "train": ("voc0712_trainval.json", "JPEGImages", "trainval_"),
        "val": ("voc07_test.json", "JPEGImages", "test_"),
    }
    ids = range(1, len(VOC_CLASSES) + 1)
    _detection(Path(root), splits, ids, VOC_USED, VOC_CLASSES, seed=2)


def write_imagenet(root: str | Path, num_classes: int = IMAGENET_CLASSES) -> None:
    """ImageNet's ImageFolder layout (train/<wnid>/, val/<wnid>/): its 1000 classes (the
    classifier keeps its 1000-way head), one small image of noise each per split."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        folder = Path(root) / split
        if folder.exists():
            shutil.rmtree(folder)
        for c in range(num_classes):
            pixels = rng.integers(0, 256, (CLS_SIZE // 2, CLS_SIZE // 2, 3), dtype=np.uint8)
            dest = folder / f"n{c:08d}" / f"{split}_{c:08d}.JPEG"
            dest.parent.mkdir(parents=True)
            Image.fromarray(pixels).save(dest, format="JPEG", quality=90)


FIXTURES = {"coco": write_coco, "voc": write_voc, "imagenet": write_imagenet}


def write_fixture(dataset: str, root: str | Path) -> None:
    """Write the fixture of ``dataset`` (coco, voc or imagenet) under ``root``."""
    FIXTURES[dataset](root)
