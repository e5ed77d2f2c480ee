"""check_coco: passes on good data and names every planted problem."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest

from detprune.data.coco import DatasetError, check_coco
from detprune.data.synth import write_synthetic


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco_check")
    write_synthetic(out, seed=5, num_train=2, num_val=6)
    return out


@pytest.fixture
def val(synth_dir: Path) -> dict:
    return json.loads((synth_dir / "instances_val.json").read_text())


@pytest.fixture
def image_dir(synth_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the val images that a test may damage."""
    return Path(shutil.copytree(synth_dir / "val", tmp_path / "images"))


def write(tmp_path: Path, coco: dict, name: str = "bad_val.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(coco))
    return path


def raised(ann_file: Path, image_dir: Path, **kwargs: bool) -> str:
    with pytest.raises(DatasetError) as info:
        check_coco(ann_file, image_dir, **kwargs)
    return str(info.value)


def test_synthetic_data_passes(synth_dir: Path, val: dict) -> None:
    summary = check_coco(synth_dir / "instances_val.json", synth_dir / "val")
    assert summary["num_images"] == 6
    assert summary["num_annotations"] == len(val["annotations"]) > 6
    assert summary["num_categories"] == 6 and summary["num_crowd"] == 0
    assert summary["categories"][0] == "circle"
    train = check_coco(str(synth_dir / "instances_train.json"), str(synth_dir / "train"))
    assert train["num_images"] == 2


def test_box_outside_the_image(tmp_path: Path, val: dict, synth_dir: Path) -> None:
    ann = val["annotations"][3]
    ann["bbox"] = [120.0, 10.0, 30.0, 20.0]
    path = write(tmp_path, val)
    msg = raised(path, synth_dir / "val")
    expected = (
        f"{path}: annotation id {ann['id']} (image id {ann['image_id']}): "
        "box [120.0, 10.0, 30.0, 20.0] extends outside the 128x128 image"
    )
    assert expected in msg.splitlines()
    assert msg.startswith(f"1 problem in {path}:")


def test_box_within_tolerance_passes(tmp_path: Path, val: dict, synth_dir: Path) -> None:
    val["annotations"][0]["bbox"] = [-0.5, -0.5, 128.9, 10.0]
    check_coco(write(tmp_path, val), synth_dir / "val")


def test_zero_width_box(tmp_path: Path, val: dict, synth_dir: Path) -> None:
    ann = val["annotations"][1]
    ann["bbox"][2] = 0
    path = write(tmp_path, val)
    msg = raised(path, synth_dir / "val")
    assert f"{path.name}: annotation id {ann['id']} (image id {ann['image_id']}): " in msg
    assert "non-positive width or height" in msg


def test_every_problem_is_listed_once_per_line(tmp_path: Path, val: dict, synth_dir: Path) -> None:
    anns = val["annotations"]
    anns[0]["bbox"] = [100.0, 100.0, 50.0, 50.0]
    anns[1]["category_id"] = 99
    anns[2]["image_id"] = 12345
    anns[3]["bbox"] = [1.0, 2.0, 3.0]
    anns[4]["bbox"][3] = -2.0
    path = write(tmp_path, val)
    lines = raised(path, synth_dir / "val").splitlines()
    assert lines[0] == f"5 problems in {path}:"
    assert len(lines) == 6
    assert all(line.startswith(f"{path}: annotation id ") for line in lines[1:])
    assert f"annotation id {anns[0]['id']} " in lines[1] and "outside" in lines[1]
    assert "unknown category id 99" in lines[2]
    assert "unknown image id 12345" in lines[3]
    assert "bbox [1.0, 2.0, 3.0] is not 4 finite numbers" in lines[4]
    assert "non-positive width or height" in lines[5]


def test_unknown_category_id(tmp_path: Path, val: dict, synth_dir: Path) -> None:
    ann = val["annotations"][0]
    ann["category_id"] = 42
    msg = raised(write(tmp_path, val), synth_dir / "val")
    assert f"annotation id {ann['id']} (image id {ann['image_id']}): unknown category id 42" in msg


def test_duplicate_ids(tmp_path: Path, val: dict, synth_dir: Path) -> None:
    anns = val["annotations"]
    anns[5]["id"] = anns[2]["id"]
    val["images"].append(copy.deepcopy(val["images"][0]))
    val["categories"].append({"id": 1, "name": "again"})
    msg = raised(write(tmp_path, val), synth_dir / "val")
    assert f"annotation id {anns[2]['id']} (image id {anns[5]['image_id']}): duplicate" in msg
    assert f"image id {val['images'][0]['id']}: duplicate image id" in msg
    assert "category id 1: duplicate category id" in msg


def test_missing_image_file(synth_dir: Path, image_dir: Path) -> None:
    (image_dir / "000002.png").unlink()
    msg = raised(synth_dir / "instances_val.json", image_dir)
    assert "image id 3 (000002.png): file not found" in msg
    assert str(image_dir / "000002.png") in msg
    summary = check_coco(synth_dir / "instances_val.json", image_dir, check_images=False)
    assert summary["images_checked"] is False


def test_garbage_png(synth_dir: Path, image_dir: Path) -> None:
    (image_dir / "000004.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    msg = raised(synth_dir / "instances_val.json", image_dir)
    assert msg.count("\n") == 1
    assert "image id 5 (000004.png): unreadable image" in msg


def test_truncated_png(synth_dir: Path, image_dir: Path) -> None:
    path = image_dir / "000001.png"
    path.write_bytes(path.read_bytes()[:2000])
    assert "image id 2 (000001.png): unreadable image" in raised(
        synth_dir / "instances_val.json", image_dir
    )


def test_image_size_mismatch(tmp_path: Path, val: dict, synth_dir: Path) -> None:
    val["images"][0]["width"] = 200
    msg = raised(write(tmp_path, val), synth_dir / "val")
    assert "image id 1 (000000.png): image is 128x128 but the JSON says 200x128" in msg
    check_coco(write(tmp_path, val), synth_dir / "val", check_images=False)


def test_invalid_json(tmp_path: Path, synth_dir: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"images": [1, 2,')
    msg = raised(path, synth_dir / "val")
    assert msg.startswith(f"{path}: invalid JSON")
    assert "line 1" in msg


def test_unreadable_and_absent_files(tmp_path: Path, synth_dir: Path) -> None:
    assert "cannot read" in raised(tmp_path / "absent.json", synth_dir / "val")
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert str(path) in raised(path, synth_dir / "val")


def test_missing_top_level_keys(tmp_path: Path, val: dict, synth_dir: Path) -> None:
    del val["annotations"], val["categories"]
    path = write(tmp_path, val)
    assert raised(path, synth_dir / "val") == (
        f"{path}: missing top-level key(s): annotations, categories"
    )
    path.write_text("[]")
    assert "not an object" in raised(path, synth_dir / "val")


def test_missing_area_and_bad_iscrowd(tmp_path: Path, val: dict, synth_dir: Path) -> None:
    anns = val["annotations"]
    del anns[0]["area"]
    anns[1]["iscrowd"] = 2
    msg = raised(write(tmp_path, val), synth_dir / "val")
    assert f"annotation id {anns[0]['id']} (image id {anns[0]['image_id']}): area None" in msg
    assert f"annotation id {anns[1]['id']} " in msg and "iscrowd 2 is not 0 or 1" in msg


def test_long_lists_are_cut(tmp_path: Path, val: dict, synth_dir: Path) -> None:
    extra = [
        {"id": 1000 + i, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 5], "area": 0}
        for i in range(60)
    ]
    val["annotations"].extend(extra)
    lines = raised(write(tmp_path, val), synth_dir / "val").splitlines()
    assert lines[0].startswith("60 problems in ")
    assert len(lines) == 52 and lines[-1] == "... and 10 more"


def test_cli_refuses_a_negative_width(
    tmp_path: Path, val: dict, synth_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`detprune data check` (the workflow's check_data job) exits 2 naming the file and
    the annotation id, and writes no report: train_baseline, which needs it, never starts."""
    from detprune.cli import main

    ann = val["annotations"][2]
    ann["bbox"][2] = -4.0
    path, report = write(tmp_path, val), tmp_path / "check_train.json"
    try:
        with pytest.raises(SystemExit) as exc:
            args = ["--images", str(synth_dir / "val"), "--out", str(report)]
            main(["data", "check", "--ann", str(path), *args])
    finally:
        root = logging.getLogger()
        for h in list(root.handlers):  # main() installed them on a captured stderr
            root.removeHandler(h)
            h.close()
    assert exc.value.code == 2
    box = [float(v) for v in ann["bbox"]]
    assert (
        f"{path}: annotation id {ann['id']} (image id {ann['image_id']}): "
        f"box {box} has non-positive width or height"
    ) in capsys.readouterr().err.splitlines()
    assert not report.exists()
