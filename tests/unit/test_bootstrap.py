"""Paired bootstrap of COCO AP, checked against COCOeval run from scratch."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from detprune.evaluation.bootstrap import (
    bootstrap_record,
    delta_interval,
    full_ap,
    mark,
    per_image_eval,
    resample_indices,
    resampled_ap,
    resampled_stats,
)
from detprune.evaluation.coco_eval import evaluate_detections

N_IMAGES = 12
CATS = (1, 2, 3)


def coco_from(images: list[int], anns: list[dict]) -> COCO:
    dataset = {
        "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in images],
        "categories": [{"id": c, "name": f"c{c}"} for c in CATS],
        "annotations": [{**a, "id": n + 1} for n, a in enumerate(anns)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def make_case(every_class: bool = False, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """GT annotations and detections on images 1..12: several classes, misses (FN), false
    positives, tied scores (1 decimal), a crowd box. Without ``every_class``, image 12 has
    no ground truth and some images lack some classes; with it every image holds every class.
    """
    rng = np.random.default_rng(seed)
    anns, dets = [], []
    for img in range(1, N_IMAGES + 1):
        for cat in CATS:
            count = int(rng.integers(1, 3)) if every_class else int(rng.integers(0, 3))
            if img == N_IMAGES and not every_class:
                count = 0
            for _ in range(count):
                w, h = rng.uniform(10, 80, size=2)
                x, y = rng.uniform(0, 200 - w), rng.uniform(0, 200 - h)
                box = [float(x), float(y), float(w), float(h)]
                anns.append(
                    {"image_id": img, "category_id": cat, "bbox": box, "area": w * h, "iscrowd": 0}
                )
                if rng.random() < 0.75:  # found, with a jittered box; else a miss
                    jit = [box[0] + rng.normal(0, 3), box[1] + rng.normal(0, 3), box[2], box[3]]
                    dets.append(det(img, cat, jit, round(float(rng.uniform(0.3, 1.0)), 1)))
        for _ in range(2):  # false positives
            w, h = rng.uniform(10, 60, size=2)
            box = [float(rng.uniform(0, 140)), float(rng.uniform(0, 140)), float(w), float(h)]
            dets.append(det(img, int(rng.choice(CATS)), box, round(float(rng.uniform(0, 0.8)), 1)))
    crowd = [100.0, 100.0, 90.0, 90.0]
    anns.append({"image_id": 1, "category_id": 1, "bbox": crowd, "area": 8100.0, "iscrowd": 1})
    dets.append(det(1, 1, [110.0, 110.0, 40.0, 40.0], 0.5))  # on the crowd box: ignored
    return anns, dets


def det(img: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": img, "category_id": cat, "bbox": [float(v) for v in box], "score": score}


def gt_of(anns: list[dict]) -> COCO:
    return coco_from(list(range(1, N_IMAGES + 1)), anns)


def coco_ap(gt: COCO, dets: list[dict], image_ids: list[int] | None = None) -> float:
    metrics, _ = evaluate_detections(gt, dets, image_ids=image_ids)
    return float(metrics["AP"])


def test_full_set_equals_cocoeval_stats0() -> None:
    anns, dets = make_case()
    gt = gt_of(anns)
    evaluator = per_image_eval(gt, dets)
    expected = coco_ap(gt, dets)
    assert 0.2 < expected < 0.9  # FP and FN: neither trivial nor perfect
    assert full_ap(evaluator) == pytest.approx(expected, abs=1e-9)
    # the evaluator is left as it was: same image list, and a second pass agrees
    assert evaluator.params.imgIds == list(range(1, N_IMAGES + 1))
    resampled_ap(evaluator, resample_indices(N_IMAGES, 5, seed=1))
    assert evaluator.params.imgIds == list(range(1, N_IMAGES + 1))
    assert len(evaluator._paramsEval.areaRng) == 4 and evaluator.params.maxDets == [1, 10, 100]
    assert full_ap(evaluator) == pytest.approx(expected, abs=1e-9)


def test_resample_equals_cocoeval_on_really_duplicated_images() -> None:
    anns, dets = make_case()
    gt = gt_of(anns)
    image_ids = [11, 3, 1, 2, 12, 4, 5, 6, 7, 8, 10]  # all but 9, unsorted
    positions_to_id = sorted(image_ids)
    evaluator = per_image_eval(gt, dets, image_ids)
    indices = resample_indices(len(image_ids), 4, seed=3)
    aps = resampled_ap(evaluator, indices)
    stats = resampled_stats(evaluator, indices)
    assert np.array_equal(stats[:, 0], aps)
    for row, ap, ap50 in zip(indices, aps, stats[:, 1], strict=True):
        assert len(set(row.tolist())) < len(row)  # duplicates are what this test is about
        # rebuild the resample as a real data set: the k-th drawn image becomes image 1000+k
        new_anns, new_dets = [], []
        for k, pos in enumerate(row):
            old = positions_to_id[pos]
            new_anns += [{**a, "image_id": 1000 + k} for a in anns if a["image_id"] == old]
            new_dets += [{**d, "image_id": 1000 + k} for d in dets if d["image_id"] == old]
        dup_gt = coco_from([1000 + k for k in range(len(row))], new_anns)
        assert ap == pytest.approx(coco_ap(dup_gt, new_dets), abs=1e-9)
        ap50_coco = evaluate_detections(dup_gt, new_dets)[0]["AP50"]
        assert ap50 == pytest.approx(ap50_coco, abs=1e-9) and ap50 != pytest.approx(ap)
    assert len(set(np.round(aps, 12))) > 1  # the resamples really differ


def test_identical_detections_give_a_zero_width_interval() -> None:
    anns, dets = make_case()
    gt = gt_of(anns)
    a = bootstrap_record(gt, dets, resamples=100, seed=0)
    b = bootstrap_record(gt, [dict(d) for d in dets], resamples=100, seed=0)
    assert a["AP_full"] - b["AP_full"] == 0.0
    lo, hi = delta_interval([np.array(a["AP"])], [np.array(b["AP"])])
    assert lo == 0.0 and hi == 0.0
    assert mark(lo, hi) == "within noise"


def test_a_constant_planted_gain_shifts_the_interval_by_exactly_that_gain() -> None:
    # every image holds every class; A never detects class 3, B = A + perfect class-3 boxes.
    # AP is the mean over the 3 classes, so on every resample AP_B - AP_A = (1 - 0) / 3.
    anns, dets = make_case(every_class=True, seed=1)
    gt = gt_of(anns)
    model_a = [d for d in dets if d["category_id"] != 3]
    model_b = model_a + [
        det(a["image_id"], 3, a["bbox"], 1.0) for a in anns if a["category_id"] == 3
    ]
    d = coco_ap(gt, model_b) - coco_ap(gt, model_a)
    assert d == pytest.approx(1 / 3, abs=1e-9)
    rec_a = bootstrap_record(gt, model_a, resamples=100, seed=7)
    rec_b = bootstrap_record(gt, model_b, resamples=100, seed=7)
    assert rec_b["AP_full"] - rec_a["AP_full"] == pytest.approx(d, abs=1e-9)
    lo, hi = delta_interval([np.array(rec_b["AP"])], [np.array(rec_a["AP"])])
    assert lo == pytest.approx(d, abs=1e-9) and hi == pytest.approx(d, abs=1e-9)
    assert mark(lo, hi) == "better"


def test_a_planted_gain_on_some_images_is_detected() -> None:
    # B = A plus a perfect box, score 1, for every object on images 1..6
    anns, dets = make_case()
    gt = gt_of(anns)
    ev = per_image_eval(gt, dets)
    subset = [a for a in anns if a["image_id"] <= 6 and not a["iscrowd"]]
    extra = [det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in subset]
    model_b = dets + extra
    d = coco_ap(gt, model_b) - coco_ap(gt, dets)
    assert d > 0.05
    ev_b = per_image_eval(gt, model_b)
    assert full_ap(ev_b) - full_ap(ev) == pytest.approx(d, abs=1e-9)
    indices = resample_indices(N_IMAGES, 200, seed=0)
    ap_a, ap_b = resampled_ap(ev, indices), resampled_ap(ev_b, indices)
    lo, hi = delta_interval([ap_b], [ap_a])
    assert lo < d < hi and lo > 0
    assert mark(lo, hi) == "better"
    rev_lo, rev_hi = delta_interval([ap_a], [ap_b])  # the same interval, mirrored
    assert (rev_lo, rev_hi) == pytest.approx((-hi, -lo), abs=1e-12)
    assert mark(rev_lo, rev_hi) == "worse"


def test_resample_indices_are_seeded() -> None:
    first = resample_indices(50, 20, seed=4)
    assert first.shape == (20, 50) and first.min() >= 0 and first.max() < 50
    assert np.array_equal(first, resample_indices(50, 20, seed=4))
    assert not np.array_equal(first, resample_indices(50, 20, seed=5))
    with pytest.raises(ValueError):
        resample_indices(0, 20, seed=0)


def test_seed_resampling_widens_the_interval() -> None:
    v = np.linspace(0.30, 0.40, 500)
    assert delta_interval([v], [v]) == (0.0, 0.0)
    # seeds that agree add nothing (the mean of three equal values may round by 1 ulp)
    assert delta_interval([v, v, v], [v]) == pytest.approx((0.0, 0.0), abs=1e-12)
    lo1, hi1 = delta_interval([v + 0.01], [v])
    assert hi1 - lo1 == pytest.approx(0.0, abs=1e-12)
    lo3, hi3 = delta_interval([v, v + 0.01, v + 0.02], [v])
    assert hi3 - lo3 > 0.01  # the seed spread (±0.01 around the mean) now counts
    assert lo3 >= 0.0 - 1e-12 and hi3 <= 0.02 + 1e-12
    # the same call with the same seed gives the same interval
    assert delta_interval([v, v + 0.01, v + 0.02], [v]) == (lo3, hi3)


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError, match="same resamples"):
        delta_interval([np.zeros(10)], [np.zeros(11)])
    with pytest.raises(ValueError, match="same resamples"):
        delta_interval([np.zeros(10), np.zeros(9)], [np.zeros(10)])
    with pytest.raises(ValueError, match="at least one"):
        delta_interval([], [np.zeros(10)])


def test_mark() -> None:
    assert mark(0.1, 2.0) == "better"
    assert mark(-2.0, -0.1) == "worse"
    assert mark(-1.0, 1.0) == mark(0.0, 0.0) == mark(0.0, 1.0) == "within noise"


def test_bootstrap_record_fields() -> None:
    anns, dets = make_case()
    gt = gt_of(anns)
    ids = [5, 1, 3, 2, 4, 6, 7, 8]
    rec = bootstrap_record(gt, dets, image_ids=ids, resamples=50, seed=2)
    assert set(rec) == {
        "method",
        "resamples",
        "seed",
        "images",
        "image_ids_sha256",
        "AP",
        "AP50",
        "AP_full",
    }
    assert rec["method"] == "paired percentile bootstrap over test images"
    assert (rec["resamples"], rec["seed"], rec["images"]) == (50, 2, 8)
    assert len(rec["AP"]) == len(rec["AP50"]) == 50
    assert all(type(v) is float for v in rec["AP"] + rec["AP50"])
    assert rec["AP_full"] == pytest.approx(coco_ap(gt, dets, ids), abs=1e-9)
    sha = hashlib.sha256(json.dumps(sorted(ids), separators=(",", ":")).encode()).hexdigest()
    assert rec["image_ids_sha256"] == sha
    assert json.loads(json.dumps(rec)) == rec
    again = bootstrap_record(gt, dets, image_ids=sorted(ids), resamples=50, seed=2)
    assert again == rec
