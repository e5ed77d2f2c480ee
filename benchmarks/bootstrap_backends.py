"""Per-resample cost of the bootstrap's re-accumulation: pycocotools against faster-coco-eval.

    python benchmarks/bootstrap_backends.py results/models/finetuned/depgraph/flops10/seed0.pt

Scores a checkpoint on the default run's test split (1 thread), then re-accumulates the same
resamples with pycocotools' pure-Python ``COCOeval.accumulate()`` (the restricted, area 'all'
/ maxDets 100 copy the bootstrap used before) and with faster-coco-eval's C++ one (what
``detprune.evaluation.bootstrap`` uses), and prints CPU seconds per resample and the largest
difference of the resampled APs. Output of a run: ``benchmarks/bootstrap_speed.md``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import time

import numpy as np
import torch

from detprune.data.coco import CocoDetection
from detprune.evaluation.bootstrap import per_image_eval, resample_indices, resampled_ap
from detprune.evaluation.coco_eval import build_evaluator
from detprune.train import checkpoint
from detprune.train.engine import predict

TEST = ("results/data/synth/instances_test.json", "results/data/synth/test")


def pycocotools_resampled_ap(coco_gt, detections, indices: np.ndarray) -> np.ndarray:
    """The same resamples through pycocotools' own ``evaluate()`` and ``accumulate()``."""
    ev = build_evaluator(coco_gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    pe = ev._paramsEval
    k, a, n = len(pe.catIds), len(pe.areaRng), len(pe.imgIds)
    table = np.empty(len(ev.evalImgs), dtype=object)
    table[:] = ev.evalImgs
    per_cat = table.reshape(k, a, n)[:, pe.areaRngLbl.index("all"), :]
    work = copy.copy(ev)
    params, pe2 = copy.copy(ev.params), copy.copy(pe)
    work.params, work._paramsEval = params, pe2
    for p in (params, pe2):
        p.areaRng, p.areaRngLbl, p.maxDets = [pe.areaRng[0]], ["all"], [100]
    ids = np.asarray(pe.imgIds)
    out = []
    for positions in indices:
        work.evalImgs = per_cat[:, positions].ravel().tolist()
        params.imgIds = pe2.imgIds = ids[positions].tolist()
        with contextlib.redirect_stdout(io.StringIO()):
            work.accumulate()
        prec = work.eval["precision"]
        out.append(float(np.mean(prec[prec > -1])))
    return np.asarray(out)


def main(ckpt: str, resamples: int = 100) -> None:
    torch.set_num_threads(1)
    model, _ = checkpoint.load_model(ckpt)
    data = CocoDetection(*TEST)
    dets = predict(model, data, torch.device("cpu"), 8)
    indices = resample_indices(len(data.ids), resamples, 0)
    t0 = time.process_time()
    ref = pycocotools_resampled_ap(data.coco, dets, indices)
    t1 = time.process_time()
    fast = resampled_ap(per_image_eval(data.coco, dets, data.ids), indices)
    t2 = time.process_time()
    print(f"{ckpt}: {len(dets)} detections on {len(data.ids)} images, {resamples} resamples")
    print(f"pycocotools evaluate + accumulate: {1000 * (t1 - t0) / resamples:.1f} ms a resample")
    print(f"faster-coco-eval evaluate + accumulate: {1000 * (t2 - t1) / resamples:.1f} ms")
    print(f"largest |AP difference|: {np.max(np.abs(ref - fast)):.3g}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100)
