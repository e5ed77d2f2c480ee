"""Paired percentile bootstrap of COCO box AP over test images.

The percentile bootstrap (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993,
ch. 13): resample the test images with replacement ``B`` times, score every resample, and
read a confidence interval off the percentiles of the resampled statistic. The resamples
depend only on the number of images and a seed (:func:`resample_indices`), so every model
scored on the same image list sees the same resamples: differences between two models are
*paired* over images.

No AP arithmetic happens here. COCOeval's per-image matching (``evaluate()``) runs once per
detections file; each resample then rebuilds the per-image results in the resampled image
order (duplicates included) and calls COCOeval's own ``accumulate()``; AP is read from
``eval['precision']`` exactly as ``COCOeval.summarize()`` computes ``stats[0]``.

The COCOeval here is faster-coco-eval's (``COCOeval_faster``): the same per-image matching
and accumulation as pycocotools, in C++. pycocotools' pure-Python ``accumulate()`` took
44 ms a resample on the default detector's 18.5k test detections, 44 s of the 57 s an
evaluation job took, and pushed the default run past its time budget; faster-coco-eval's
takes 13 ms and gives identical values (``benchmarks/bootstrap_speed.md``; the tests check
them against pycocotools' ``COCOeval`` to 1e-9). The headline metrics of a record stay
pycocotools' (:func:`detprune.evaluation.coco_eval.evaluate_detections`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from faster_coco_eval import COCO as FastCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO

from detprune.evaluation.coco_eval import select_detections

METHOD = "paired percentile bootstrap over test images"
#: The area range and detection cap of COCO's headline AP (``stats[0]``).
AREA_ALL = "all"
MAX_DETS = 100


def _quiet(*_: Any) -> None:
    """faster-coco-eval's ``print_function``: say nothing."""


def per_image_eval(
    coco_gt: COCO, detections: list[dict[str, Any]], image_ids: Sequence[int] | None = None
) -> COCOeval_faster:
    """A bbox ``COCOeval_faster`` of ``detections`` on ``image_ids`` with ``evaluate()`` done.

    ``coco_gt`` is pycocotools' ground truth (a dataset's); its dataset is copied into
    faster-coco-eval's. The evaluator's ``_paramsEval.imgIds`` (sorted, unique) is the image
    list the resample positions of :func:`resample_indices` refer to.
    """
    wanted, dets = select_detections(coco_gt, detections, image_ids)
    gt = FastCOCO(coco_gt.dataset, use_deepcopy=True, print_function=_quiet)
    if dets:
        dt = gt.loadRes(dets)
    else:  # no detections: a result set with the images and no annotations
        dt = FastCOCO({**gt.dataset, "annotations": []}, use_deepcopy=True, print_function=_quiet)
    evaluator = COCOeval_faster(gt, dt, "bbox", separate_eval=True, print_function=_quiet)
    evaluator.params.imgIds = wanted
    evaluator.evaluate()
    return evaluator


def resample_indices(n_images: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n_images]`` positions drawn with replacement (``default_rng(seed)``).

    The draw depends only on its arguments: every model scored on the same image list with
    the same seed gets the same resamples, which is what pairs them.
    """
    if n_images < 1 or resamples < 1:
        raise ValueError(f"need n_images >= 1 and resamples >= 1, got {n_images}, {resamples}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_images, size=(resamples, n_images))


def _per_category_all(evaluator: COCOeval_faster) -> tuple[np.ndarray, list[float]]:
    """The per-image results of area 'all' as a ``[K, N]`` object array, and that area range.

    ``evaluate()`` lays its per-image results (``_evalImgs_cpp``) out as
    ``[category][area][image]`` over ``_paramsEval`` (catIds x areaRng x imgIds), as
    pycocotools lays out ``evalImgs``.
    """
    pe = evaluator._paramsEval
    per_image = getattr(evaluator, "_evalImgs_cpp", None)
    if not per_image:
        raise ValueError("the evaluator has no per-image results: run evaluate() first")
    if AREA_ALL not in pe.areaRngLbl or MAX_DETS not in pe.maxDets:
        raise ValueError(f"the evaluator lacks area {AREA_ALL!r} or maxDets {MAX_DETS}")
    n_cat, n_area, n_img = len(pe.catIds), len(pe.areaRng), len(pe.imgIds)
    table = np.empty(len(per_image), dtype=object)
    table[:] = per_image
    a_all = pe.areaRngLbl.index(AREA_ALL)
    return table.reshape(n_cat, n_area, n_img)[:, a_all, :], list(pe.areaRng[a_all])


def _stats0(precision: np.ndarray) -> float:
    """``COCOeval.summarize()``'s ``stats[0]``: the mean of the defined precisions, else -1."""
    defined = precision[precision > -1]
    return float(np.mean(defined)) if defined.size else -1.0


def _stats01(evaluator: COCOeval_faster) -> tuple[float, float]:
    """``stats[0]`` (AP) and ``stats[1]`` (AP50: IoU threshold 0.5 alone) as ``summarize()``
    reads them from ``eval['precision']`` ``[T, R, K, A, M]``."""
    precision = np.asarray(evaluator.eval["precision"])
    t50 = np.where(np.isclose(evaluator._paramsEval.iouThrs, 0.5))[0]
    return _stats0(precision), _stats0(precision[t50])


def resampled_ap(evaluator: COCOeval_faster, indices: np.ndarray) -> np.ndarray:
    """AP (``stats[0]``) of each resample: ``indices`` ``[B, n]`` positions -> ``[B]``."""
    return resampled_stats(evaluator, indices)[:, 0]


def resampled_stats(evaluator: COCOeval_faster, indices: np.ndarray) -> np.ndarray:
    """AP and AP50 (``stats[0:2]``) of each resample: ``[B, n]`` positions -> ``[B, 2]``.

    Positions index ``evaluator._paramsEval.imgIds``. Per resample, a shallow copy of the
    evaluator gets its per-image results rebuilt in the resampled order and
    ``_paramsEval.imgIds`` set to the resampled id list: ``accumulate()`` reads the result
    of category ``k``, area ``a`` and position ``i`` at ``k*A*I + a*I + i`` with
    ``I = len(imgIds)``, so a duplicated image counts twice, as if it were two images. The
    copy is restricted to area 'all' and maxDets [100]: ``accumulate()`` computes each
    (category, area, maxDets) slice of ``precision`` independently of the others, and
    ``stats[0]`` reads only that slice, so the restricted run yields it unchanged.
    ``evaluate()`` already capped detections at ``maxDets[-1]`` per image and category.
    The evaluator itself is left untouched.
    """
    indices = np.atleast_2d(np.asarray(indices, dtype=np.int64))
    per_cat, area_all = _per_category_all(evaluator)
    ids = np.asarray(evaluator._paramsEval.imgIds)
    if indices.size and (indices.min() < 0 or indices.max() >= len(ids)):
        raise ValueError(f"resample positions must lie in [0, {len(ids)})")
    work = copy.copy(evaluator)
    pe = work._paramsEval = copy.copy(evaluator._paramsEval)
    pe.areaRng, pe.areaRngLbl, pe.maxDets = [area_all], [AREA_ALL], [MAX_DETS]
    out = np.empty((len(indices), 2), dtype=float)
    for r, positions in enumerate(indices):
        work._evalImgs_cpp = per_cat[:, positions].ravel().tolist()
        pe.imgIds = ids[positions].tolist()
        work.accumulate()
        out[r] = _stats01(work)
    return out


def full_ap(evaluator: COCOeval_faster) -> float:
    """AP of the full image set (every image once): equals ``COCOeval``'s ``stats[0]``."""
    n = len(evaluator._paramsEval.imgIds)
    return float(resampled_ap(evaluator, np.arange(n)[None, :])[0])


def image_ids_sha256(image_ids: Sequence[int]) -> str:
    """sha256 of the sorted, unique image ids written as a compact JSON list."""
    text = json.dumps(sorted({int(i) for i in image_ids}), separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def bootstrap_record(
    coco_gt: COCO,
    detections: list[dict[str, Any]],
    image_ids: Sequence[int] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``"bootstrap"`` entry of a metrics record: per-resample AP and the full-set AP.

    ``AP`` (``AP50``) lists the AP (AP50) of each of ``resamples`` resamples of the test
    images (drawn by :func:`resample_indices` with ``seed``), ``AP_full`` the AP of the full
    set. A resample holding no ground truth at all has AP -1, as ``COCOeval`` reports it.
    """
    evaluator = per_image_eval(coco_gt, detections, image_ids)
    ids = list(evaluator._paramsEval.imgIds)
    ap_full = full_ap(evaluator)
    if ap_full < 0:
        raise ValueError("the test images hold no ground truth: AP is undefined")
    stats = resampled_stats(evaluator, resample_indices(len(ids), resamples, seed))
    return {
        "method": METHOD,
        "resamples": int(resamples),
        "seed": int(seed),
        "images": len(ids),
        "image_ids_sha256": image_ids_sha256(ids),
        "AP": [float(v) for v in stats[:, 0]],
        "AP50": [float(v) for v in stats[:, 1]],
        "AP_full": ap_full,
    }


def _seed_means(vectors: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Per resample, the mean over seeds drawn with replacement (no draw for one seed)."""
    stacked = np.stack([np.asarray(v, dtype=float) for v in vectors], axis=1)  # [B, S]
    n_res, n_seeds = stacked.shape
    if n_seeds == 1:
        return stacked[:, 0]
    drawn = rng.integers(0, n_seeds, size=(n_res, n_seeds))
    return np.take_along_axis(stacked, drawn, axis=1).mean(axis=1)


def delta_interval(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], *, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of ``mean(a) - mean(b)``, seeds and images resampled together.

    ``a`` and ``b`` list, per training seed, the per-resample AP vectors of two models, all
    on the same resamples (paired over images). For each resample ``r`` the seeds of each
    side are drawn with replacement (``default_rng(seed)``) and
    ``delta_r = mean(a[s][r]) - mean(b[s'][r])``; the interval is the ``(1 - level) / 2``
    and ``1 - (1 - level) / 2`` percentiles of ``delta_r``.
    """
    if not a or not b:
        raise ValueError("delta_interval needs at least one AP vector on each side")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    lengths = {len(v) for v in (*a, *b)}
    if len(lengths) != 1:
        raise ValueError(
            f"per-resample AP vectors differ in length {sorted(lengths)}: "
            "both sides must be scored on the same resamples"
        )
    rng = np.random.default_rng(seed)
    delta = _seed_means(a, rng) - _seed_means(b, rng)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(delta, [tail, 100.0 - tail])
    return float(lo), float(hi)


def mark(lo: float, hi: float) -> str:
    """Return "better" when ``lo > 0``, "worse" when ``hi < 0``, else "within noise"."""
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "within noise"
