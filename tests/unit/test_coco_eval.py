"""COCO box AP through pycocotools on a tiny hand-made ground truth."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO

from detprune.evaluation.coco_eval import METRIC_NAMES, detections_to_coco, evaluate_detections

# (image_id, category_id, [x, y, w, h]): two boxes per category in each COCO size range,
# small (area < 32^2), medium and large (> 96^2). Two, because COCOeval divides by
# (tp + fp + eps): a range holding a single box would score 1 - 1e-16 instead of exactly 1.
GT_BOXES = [
    (1, 3, [10.0, 10.0, 20.0, 20.0]),  # small, 400
    (1, 3, [40.0, 10.0, 16.0, 24.0]),  # small, 384
    (1, 7, [70.0, 10.0, 25.0, 25.0]),  # small, 625
    (1, 7, [110.0, 10.0, 30.0, 30.0]),  # small, 900
    (1, 3, [10.0, 60.0, 60.0, 50.0]),  # medium, 3000
    (1, 7, [100.0, 60.0, 80.0, 40.0]),  # medium, 3200
    (2, 3, [0.0, 0.0, 120.0, 150.0]),  # large, 18000
    (2, 7, [130.0, 10.0, 50.0, 50.0]),  # medium, 2500
    (2, 3, [130.0, 100.0, 40.0, 40.0]),  # medium, 1600
    (2, 7, [100.0, 100.0, 100.0, 100.0]),  # large, 10000
    (3, 7, [20.0, 30.0, 110.0, 100.0]),  # large, 11000
    (3, 3, [60.0, 90.0, 130.0, 100.0]),  # large, 13000
]


def make_gt() -> COCO:
    dataset = {
        "images": [
            {"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in (1, 2, 3)
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {
                "id": n + 1,
                "image_id": img,
                "category_id": cat,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for n, (img, cat, box) in enumerate(GT_BOXES)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def perfect_detections() -> list[dict]:
    return [
        {"image_id": img, "category_id": cat, "bbox": list(box), "score": 1.0}
        for img, cat, box in GT_BOXES
    ]


def test_perfect_detections_score_one() -> None:
    metrics, summary = evaluate_detections(make_gt(), perfect_detections())
    assert set(metrics) == set(METRIC_NAMES)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert metrics[name] == 1.0, name
    assert "Average Precision" in summary
    assert len(summary.strip().splitlines()) == 12


def test_shifted_box_lowers_ap() -> None:
    dets = perfect_detections()
    x, y, w, h = dets[6]["bbox"]
    dets[6]["bbox"] = [x + w / 2, y, w, h]  # IoU 1/3: a miss at every threshold
    metrics, _ = evaluate_detections(make_gt(), dets)
    assert metrics["AP"] is not None and metrics["AP"] < 1.0
    assert metrics["APl"] < 1.0
    assert metrics["APs"] == 1.0  # the small boxes are untouched


def test_input_is_not_modified() -> None:
    dets = perfect_detections()
    evaluate_detections(make_gt(), dets)
    assert dets == perfect_detections()


def test_empty_detections_give_zero() -> None:
    metrics, summary = evaluate_detections(make_gt(), [])
    assert metrics["AP"] == 0.0
    assert all(metrics[name] == 0.0 for name in METRIC_NAMES)
    assert "Average Precision" in summary


def test_restricting_image_ids() -> None:
    dets = perfect_detections()
    dets = [d for d in dets if d["image_id"] != 3]  # image 3 gets no detections
    full, _ = evaluate_detections(make_gt(), dets)
    assert full["AP"] < 1.0
    restricted, _ = evaluate_detections(make_gt(), dets, image_ids=[1, 2])
    assert restricted["AP"] == 1.0
    # Image 1 holds no large box: large-object stats are undefined there.
    only_one, _ = evaluate_detections(make_gt(), dets, image_ids=[1])
    assert only_one["APl"] is None and only_one["ARl"] is None
    assert only_one["AP"] == 1.0 and only_one["APs"] == 1.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_detections(make_gt(), dets, image_ids=[1, 99])


def test_detections_to_coco_converts_boxes_and_labels() -> None:
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.5, 7.25]]),
            "scores": torch.tensor([0.9, 0.25]),
            "labels": torch.tensor([1, 2], dtype=torch.int64),
        },
        {
            "boxes": torch.zeros((0, 4)),
            "scores": torch.zeros((0,)),
            "labels": torch.zeros((0,), dtype=torch.int64),
        },
    ]
    results = detections_to_coco(outputs, [5, 6], {1: 3, 2: 7})
    assert len(results) == 2
    first, second = results
    assert first["image_id"] == 5 and second["image_id"] == 5
    assert first["category_id"] == 3 and second["category_id"] == 7
    assert first["bbox"] == [10.0, 20.0, 30.0, 40.0]
    assert second["bbox"] == [0.0, 0.0, 5.5, 7.25]
    assert first["score"] == pytest.approx(0.9)
    assert all(type(v) is float for v in first["bbox"])
    assert type(first["image_id"]) is int and type(first["score"]) is float
    with pytest.raises(ValueError, match="label 9"):
        detections_to_coco([{**outputs[0], "labels": torch.tensor([1, 9])}], [5], {1: 3, 2: 7})


def test_round_trip_through_detections_to_coco() -> None:
    coco = make_gt()
    cat_to_label = {3: 1, 7: 2}
    outputs = []
    for img in (1, 2, 3):
        anns = [a for a in coco.dataset["annotations"] if a["image_id"] == img]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        outputs.append(
            {
                "boxes": torch.tensor(xyxy),
                "scores": torch.ones(len(anns)),
                "labels": torch.tensor([cat_to_label[a["category_id"]] for a in anns]),
            }
        )
    dets = detections_to_coco(outputs, [1, 2, 3], {1: 3, 2: 7})
    metrics, _ = evaluate_detections(coco, dets)
    assert metrics["AP"] == 1.0
