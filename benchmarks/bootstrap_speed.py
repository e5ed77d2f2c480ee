"""Time the paired bootstrap of COCO AP (detprune.evaluation.bootstrap) on one thread.

A synthetic test set: 500 images of 256 px, 6 classes, 2-12 ground-truth boxes per image,
50-100 detections per image (jittered copies of the ground truth plus random false
positives, scores rounded to 2 decimals so that ties occur). Compares 1000 resamples with
one plain ``COCOeval`` evaluate() + accumulate() on the same detections.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        python benchmarks/bootstrap_speed.py [--images 500] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import time

import numpy as np
from pycocotools.coco import COCO

from detprune.evaluation.bootstrap import (
    full_ap,
    per_image_eval,
    resample_indices,
    resampled_ap,
)
from detprune.evaluation.coco_eval import build_evaluator

SIZE = 256.0
CLASSES = 6


def synthetic(
    n_images: int, per_image: tuple[int, int] = (50, 100), seed: int = 0
) -> tuple[COCO, list[dict]]:
    """Ground truth and detections as described in the module docstring."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for img in range(1, n_images + 1):
        images.append({"id": img, "width": SIZE, "height": SIZE, "file_name": f"{img}.png"})
        gts = []
        for _ in range(rng.integers(2, 13)):
            w, h = rng.uniform(8, 120, size=2)
            x, y = rng.uniform(0, SIZE - w), rng.uniform(0, SIZE - h)
            cat = int(rng.integers(1, CLASSES + 1))
            gts.append((cat, [x, y, w, h]))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for _ in range(rng.integers(per_image[0], per_image[1] + 1)):
            if rng.random() < 0.3:
                cat, (x, y, w, h) = gts[rng.integers(len(gts))]
                x, y = x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h)
                w, h = w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)
                score = rng.uniform(0.2, 1.0)
            else:
                w, h = rng.uniform(8, 120, size=2)
                x, y = rng.uniform(0, SIZE - w), rng.uniform(0, SIZE - h)
                cat, score = int(rng.integers(1, CLASSES + 1)), rng.uniform(0.05, 0.7)
            dets.append(
                {
                    "image_id": img,
                    "category_id": cat,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "score": round(float(score), 2),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": images,
            "categories": [{"id": c, "name": f"c{c}"} for c in range(1, CLASSES + 1)],
            "annotations": anns,
        }
        coco.createIndex()
    return coco, dets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--dets", type=int, nargs=2, default=(50, 100), metavar=("LO", "HI"))
    parser.add_argument("--profile", action="store_true", help="cProfile 50 resamples")
    args = parser.parse_args()
    coco, dets = synthetic(args.images, tuple(args.dets))
    print(f"{args.images} images, {len(coco.dataset['annotations'])} boxes, {len(dets)} dets")
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    t0 = time.perf_counter()
    plain = build_evaluator(coco, dets)
    with contextlib.redirect_stdout(io.StringIO()):
        plain.evaluate()
        t_eval = time.perf_counter() - t0
        t1 = time.perf_counter()
        plain.accumulate()
        t_acc = time.perf_counter() - t1
        plain.summarize()
    print(f"plain COCOeval: evaluate {t_eval:.2f} s + accumulate {t_acc:.2f} s")

    t0 = time.perf_counter()
    evaluator = per_image_eval(coco, dets)
    t_once = time.perf_counter() - t0
    assert abs(full_ap(evaluator) - plain.stats[0]) < 1e-12
    indices = resample_indices(args.images, args.resamples, seed=0)
    if args.profile:
        cProfile.runctx("resampled_ap(evaluator, indices[:50])", globals(), locals(), "/tmp/bs")
        pstats.Stats("/tmp/bs").sort_stats("cumulative").print_stats(12)
    t0 = time.perf_counter()
    aps = resampled_ap(evaluator, indices)
    t_boot = time.perf_counter() - t0
    total = t_once + t_boot
    print(f"bootstrap: evaluate once {t_once:.2f} s + {args.resamples} resamples {t_boot:.2f} s")
    print(f"  {1000 * t_boot / args.resamples:.1f} ms per resample")
    print(f"  {1e6 * t_boot / args.resamples / len(dets):.2f} us per detection per resample")
    print(f"  total {total:.1f} s = {total / (t_eval + t_acc):.1f} x one plain evaluate+accumulate")
    print(f"AP full {plain.stats[0]:.4f}; resampled mean {aps.mean():.4f}, std {aps.std():.4f}")
    lo, hi = np.percentile(aps, [2.5, 97.5])
    print(f"95% percentile interval of AP: [{lo:.4f}, {hi:.4f}]")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
