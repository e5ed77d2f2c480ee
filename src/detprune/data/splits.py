"""A deterministic ``tune`` split carved from a COCO-format training set.

Choices (schedules, loss weights, sweeps) are made on the tune split: images that are
neither trained on nor reported. COCO reports val2017 and carves the tune split from
train2017; PASCAL VOC reports VOC07 test and carves it from the converted trainval JSON.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from detprune.data.coco import DatasetError
from detprune.utils.io import atomic_path

FIELD = "data.coco.tune_images"
"""The config field the tune split's size comes from (named in size errors)."""


def _dumps(obj: Any) -> str:
    # compact (train2017 is ~450 MB) and key-sorted: the same split gives the same bytes
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def carve(ann: dict[str, Any], size: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a COCO dict into (train minus tune, tune) with ``size`` tune images.

    The tune images are the first ``size`` of a ``numpy.random.default_rng(seed)``
    permutation of the sorted image ids, so they do not depend on the file's image order.
    Each output keeps the input's image and annotation order; annotations follow their
    image; ``categories``, ``info`` and ``licenses`` are copied, and ``info["carve"]``
    records the part, seed and size.
    """
    images = ann.get("images") if isinstance(ann, dict) else None
    annotations = ann.get("annotations", []) if isinstance(ann, dict) else None
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DatasetError("not a COCO instances dict: needs lists 'images' and 'annotations'")
    ids = [im.get("id") if isinstance(im, dict) else None for im in images]
    if any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
        raise DatasetError("every image needs an integer 'id'")
    if len(set(ids)) != len(ids):
        raise DatasetError("image ids are not unique")
    n = len(ids)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size < n:
        raise DatasetError(
            f"{FIELD}: {size!r} tune images requested; it must be at least 1 and less "
            f"than the number of images ({n})"
        )
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DatasetError(f"seed: {seed!r} must be a non-negative integer")
    known = set(ids)
    stray = [
        a
        for a in annotations
        if not isinstance(a, dict)
        or not isinstance(a.get("image_id"), int)
        or a["image_id"] not in known
    ]
    if stray:
        raise DatasetError(f"{len(stray)} annotations refer to no image, e.g. {stray[0]!r}")

    order = np.random.default_rng(seed).permutation(n)
    sorted_ids = sorted(ids)
    tune_ids = {sorted_ids[int(k)] for k in order[:size]}

    def part(name: str, keep: bool) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in ann.items() if k not in ("images", "annotations")}
        out["images"] = [im for im in images if (im["id"] in tune_ids) == keep]
        out["annotations"] = [a for a in annotations if (a["image_id"] in tune_ids) == keep]
        info = dict(out.get("info") or {})
        info["carve"] = {"part": name, "seed": seed, "size": size, "source_images": n}
        out["info"] = info
        return out

    return part("train", False), part("tune", True)


def carve_files(
    ann_path: str | os.PathLike[str],
    size: int,
    seed: int,
    out_train: str | os.PathLike[str],
    out_tune: str | os.PathLike[str],
) -> dict[str, Any]:
    """Carve ``ann_path`` (a COCO JSON) and write both parts; return a summary.

    Both files are written to temporary files first and renamed only when both are
    complete, so a failure leaves neither new output behind. Each output's
    ``info["carve"]`` also records the source file's name and sha256.
    """
    src, train_p, tune_p = Path(ann_path), Path(out_train), Path(out_tune)
    paths = [p.resolve() for p in (src, train_p, tune_p)]
    if len(set(paths)) != 3:
        raise DatasetError(f"--ann, --out-train and --out-tune must differ: {paths}")
    if not src.is_file():
        raise FileNotFoundError(f"{src}: annotation file does not exist")
    try:
        raw = src.read_bytes()
        ann = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{src}: cannot read the annotation file as JSON ({exc})") from exc
    try:
        train, tune = carve(ann, size, seed)
    except DatasetError as exc:
        raise DatasetError(f"{src}: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    for d in (train, tune):
        d["info"]["carve"].update(source=src.name, source_sha256=digest)

    tune_renamed = False
    try:
        with atomic_path(train_p) as tmp_train:
            with atomic_path(tune_p) as tmp_tune:
                tmp_train.write_text(_dumps(train), encoding="utf-8")
                tmp_tune.write_text(_dumps(tune), encoding="utf-8")
            tune_renamed = True
    except BaseException:
        if tune_renamed:  # the train rename failed after the tune one: drop the orphan
            tune_p.unlink(missing_ok=True)
        raise
    return {
        "source": str(src),
        "source_sha256": digest,
        "seed": seed,
        "size": size,
        "images": {"train": len(train["images"]), "tune": len(tune["images"])},
        "annotations": {"train": len(train["annotations"]), "tune": len(tune["annotations"])},
    }
