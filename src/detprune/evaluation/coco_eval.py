"""COCO box AP through pycocotools.

Detections are converted from torchvision's output format to COCO result dicts and
scored by :class:`pycocotools.cocoeval.COCOeval`; no AP arithmetic happens here.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

#: Names of ``COCOeval.stats`` in order (bbox summary, maxDets 1/10/100).
METRIC_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def _to_list(values: Any) -> list[Any]:
    """Return ``values`` (tensor, array or sequence) as a nested python list."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


def detections_to_coco(
    outputs: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_cat: Mapping[int, int],
) -> list[dict[str, Any]]:
    """Convert torchvision-style detector outputs to COCO result dicts.

    ``outputs[i]`` holds ``boxes`` ([N, 4] xyxy), ``scores`` ([N]) and ``labels`` ([N],
    contiguous training labels) for the image ``image_ids[i]``; ``label_to_cat`` maps each
    label to its COCO category id. Boxes become ``[x, y, w, h]`` rounded to 2 decimals.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(
            f"{len(outputs)} detector outputs but {len(image_ids)} image ids; they must pair up"
        )
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = _to_list(output["boxes"])
        scores = _to_list(output["scores"])
        labels = _to_list(output["labels"])
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and "
                f"{len(labels)} labels; the counts must agree"
            )
        for box, score, label in zip(boxes, scores, labels, strict=True):
            if len(box) != 4:
                raise ValueError(f"image {image_id}: box {box} does not have 4 coordinates")
            label = int(label)
            if label not in label_to_cat:
                raise ValueError(
                    f"image {image_id}: label {label} has no COCO category "
                    f"(known labels: {sorted(label_to_cat)})"
                )
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_cat[label]),
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": float(score),
                }
            )
    return results


def _empty_results(coco_gt: COCO) -> COCO:
    """A result COCO object with no detections (``loadRes`` cannot build one)."""
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    res.createIndex()
    return res


def build_evaluator(
    coco_gt: COCO,
    detections: list[dict[str, Any]],
    *,
    image_ids: Sequence[int] | None = None,
) -> COCOeval:
    """A ``COCOeval(iouType="bbox")`` of ``detections`` on ``coco_gt``, not yet evaluated.

    When ``image_ids`` is given, only those images count (detections on other images are
    dropped); ``params.imgIds`` is the sorted list of the images that count. Unknown image
    ids (asked for, or in a detection) raise ValueError. ``detections`` is not modified.
    """
    wanted, dets = select_detections(coco_gt, detections, image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    evaluator.params.imgIds = wanted
    return evaluator


def select_detections(
    coco_gt: Any, detections: list[dict[str, Any]], image_ids: Sequence[int] | None = None
) -> tuple[list[int], list[dict[str, Any]]]:
    """The sorted image ids that count and copies of the detections on them.

    ``image_ids`` None: every image of ``coco_gt``. Unknown image ids (asked for, or in a
    detection) raise ValueError; an empty selection too. ``detections`` is not modified
    (``loadRes`` annotates its input in place: it gets copies).
    """
    known_ids = set(coco_gt.getImgIds())
    if image_ids is not None:
        wanted = sorted({int(i) for i in image_ids})
        if not wanted:
            raise ValueError("image_ids is empty: there is nothing to evaluate")
        unknown = sorted(set(wanted) - known_ids)
        if unknown:
            raise ValueError(f"image ids not in the ground truth: {unknown[:10]}")
        keep = set(wanted)
        detections = [d for d in detections if int(d["image_id"]) in keep]
    else:
        wanted = sorted(known_ids)
        if not wanted:
            raise ValueError("the ground truth holds no images: there is nothing to evaluate")
    stray = sorted({int(d["image_id"]) for d in detections} - known_ids)
    if stray:
        raise ValueError(f"detections refer to image ids not in the ground truth: {stray[:10]}")
    return wanted, [{**d, "bbox": list(d["bbox"])} for d in detections]


def evaluate_detections(
    coco_gt: COCO,
    detections: list[dict[str, Any]],
    *,
    image_ids: Sequence[int] | None = None,
) -> tuple[dict[str, float | None], str]:
    """Score COCO-format ``detections`` against ``coco_gt`` with ``COCOeval(iouType="bbox")``.

    When ``image_ids`` is given, only those images count (detections on other images are
    dropped). Returns the metrics keyed by :data:`METRIC_NAMES` (a stat COCO reports as -1,
    i.e. undefined because no ground truth falls in its range, becomes ``None``) and the
    summary text that ``COCOeval.summarize`` prints.
    """
    evaluator = build_evaluator(coco_gt, detections, image_ids=image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    stats = [float(s) for s in evaluator.stats]
    if len(stats) != len(METRIC_NAMES):
        raise RuntimeError(f"COCOeval produced {len(stats)} stats, expected {len(METRIC_NAMES)}")
    metrics: dict[str, float | None] = {
        name: (None if value < 0 else value)
        for name, value in zip(METRIC_NAMES, stats, strict=True)
    }
    return metrics, summary.getvalue()
