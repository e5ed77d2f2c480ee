"""voc_to_coco on a tiny VOCdevkit written by the test."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from detprune.data.coco import CocoDetection, DatasetError, check_coco
from detprune.data.voc import VOC_CLASSES, voc_to_coco


def obj_xml(name: str, box: tuple[int, int, int, int], difficult: int = 0) -> str:
    x0, y0, x1, y1 = box
    return (
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
    )


def write_xml(root: Path, voc_id: str, size: tuple[int, int], objects: list[str]) -> None:
    text = (
        f"<annotation><folder>VOC2007</folder><filename>{voc_id}.jpg</filename>"
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{''.join(objects)}</annotation>"
    )
    (root / "Annotations" / f"{voc_id}.xml").write_text(text)


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    write_xml(
        root,
        "000005",
        (64, 48),
        [obj_xml("dog", (1, 1, 30, 20)), obj_xml("person", (10, 5, 64, 48), difficult=1)],
    )
    write_xml(root, "000007", (50, 40), [obj_xml("car", (5, 6, 25, 30))])
    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "JPEGImages" / "000005.jpg")
    Image.new("RGB", (50, 40), (30, 200, 30)).save(root / "JPEGImages" / "000007.jpg")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n")
    return root


def test_boxes_categories_and_images(voc_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "voc_trainval.json"
    summary = voc_to_coco(voc_root, "trainval", out)
    coco = json.loads(out.read_text())
    dog, person, car = (VOC_CLASSES.index(n) + 1 for n in ("dog", "person", "car"))
    assert (dog, person, car) == (12, 15, 7)
    assert coco["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": dog, "bbox": [0.0, 0.0, 30.0, 20.0],
         "area": 600.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": person, "bbox": [9.0, 4.0, 55.0, 44.0],
         "area": 2420.0, "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": car, "bbox": [4.0, 5.0, 21.0, 25.0],
         "area": 525.0, "iscrowd": 0},
    ]  # fmt: skip
    assert coco["images"] == [
        {"id": 1, "voc_id": "000005", "file_name": "000005.jpg", "width": 64, "height": 48},
        {"id": 2, "voc_id": "000007", "file_name": "000007.jpg", "width": 50, "height": 40},
    ]
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))
    assert [c["name"] for c in coco["categories"]] == list(VOC_CLASSES)
    assert summary["num_images"] == 2 and summary["num_annotations"] == 3
    assert summary["num_difficult"] == 1 and summary["per_class"]["car"] == 1
    check = check_coco(out, voc_root / "JPEGImages")
    assert check["num_crowd"] == 1 and check["num_categories"] == 20


def test_difficult_objects_stay_out_of_training_targets(voc_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "voc.json"
    voc_to_coco(voc_root, "trainval", out)
    ds = CocoDetection(out, voc_root / "JPEGImages")
    image, target = ds[0]
    assert image.shape == (3, 48, 64)
    assert torch.equal(target["boxes"], torch.tensor([[0.0, 0.0, 30.0, 20.0]]))
    assert target["labels"].tolist() == [12]


def test_same_input_gives_identical_json(voc_root: Path, tmp_path: Path) -> None:
    voc_to_coco(voc_root, "trainval", tmp_path / "a.json")
    voc_to_coco(voc_root, "trainval", tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_class_subset(voc_root: Path, tmp_path: Path) -> None:
    write_xml(voc_root, "000007", (50, 40), [obj_xml("dog", (5, 6, 25, 30))])
    out = tmp_path / "sub.json"
    voc_to_coco(voc_root, "trainval", out, classes=("person", "dog"))
    coco = json.loads(out.read_text())
    assert [a["category_id"] for a in coco["annotations"]] == [2, 1, 2]


def test_unknown_class_names_the_xml_and_object(voc_root: Path, tmp_path: Path) -> None:
    objects = [obj_xml("car", (1, 1, 5, 5)), obj_xml("unicorn", (1, 1, 5, 5))]
    write_xml(voc_root, "000007", (50, 40), objects)
    out = tmp_path / "bad.json"
    with pytest.raises(DatasetError) as info:
        voc_to_coco(voc_root, "trainval", out)
    xml = voc_root / "Annotations" / "000007.xml"
    assert f"{xml}: object 1 (unicorn): unknown class name 'unicorn'" in str(info.value)
    assert not out.exists()


def test_missing_xml_and_list(voc_root: Path, tmp_path: Path) -> None:
    (voc_root / "ImageSets" / "Main" / "val.txt").write_text("000005\n000009\n")
    with pytest.raises(DatasetError) as info:
        voc_to_coco(voc_root, "val", tmp_path / "val.json")
    assert f"{voc_root / 'Annotations' / '000009.xml'}: annotation file not found" in str(
        info.value
    )
    with pytest.raises(DatasetError, match="test.txt: cannot read the image list"):
        voc_to_coco(voc_root, "test", tmp_path / "test.json")


def test_malformed_xml(voc_root: Path, tmp_path: Path) -> None:
    (voc_root / "Annotations" / "000007.xml").write_text("<annotation><size>")
    with pytest.raises(DatasetError, match="000007.xml: cannot read the XML"):
        voc_to_coco(voc_root, "trainval", tmp_path / "x.json")
    write_xml(voc_root, "000007", (50, 40), ["<object><name>car</name></object>"])
    with pytest.raises(DatasetError, match=r"000007.xml: object 0 \(car\): bad box"):
        voc_to_coco(voc_root, "trainval", tmp_path / "x.json")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """``detprune.cli.main``; yields a function that runs it and returns (exit code, stderr)."""
    from detprune.cli import main

    def run(*argv: str) -> tuple[int, str]:
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr().err

    yield run
    root = logging.getLogger()
    for h in list(root.handlers):  # main() installed them on a captured stderr
        root.removeHandler(h)
        h.close()


def plant_faults(root: Path) -> dict[str, Path]:
    """Five faults in four XML files of ``root``'s trainval split; their XML paths."""
    xml = {i: root / "Annotations" / f"{i}.xml" for i in ("000007", "000009", "000010", "000012")}
    objects = [obj_xml("car", (5, 6, 25, 30)), obj_xml("car", (30, 6, 20, 30))]
    write_xml(root, "000007", (50, 40), [*objects, obj_xml("unicorn", (1, 1, 5, 5))])
    write_xml(root, "000009", (50, 40), [obj_xml("cat", (2, 2, 20, 20))])  # no 000009.jpg
    write_xml(root, "000010", (50, 40), [obj_xml("cat", (2, 2, 20, 20))])
    xml["000010"].write_text(xml["000010"].read_text()[:90])  # truncated
    write_xml(
        root, "000012", (50, 40), [obj_xml("dog", (1, 1, 10, 10)), obj_xml("dog", (5, 5, 52, 30))]
    )
    for i in ("000010", "000012"):
        Image.new("RGB", (50, 40)).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(["000005", *xml]) + "\n")
    return xml


def test_cli_lists_every_fault_and_writes_nothing(voc_root: Path, tmp_path: Path, cli) -> None:
    xml = plant_faults(voc_root)
    out = tmp_path / "out" / "trainval.json"
    args = ("data", "voc2coco", "--voc-root", str(voc_root), "--split", "trainval")
    code, err = cli(*args, "--out", str(out))
    assert code == 2
    lines = err.splitlines()
    assert lines[-6].endswith(
        f"ERROR 5 problems in VOC trainval split under {voc_root} "
        "(objects counted from 0 in each XML file):"
    )
    box = "[xmin 30, ymin 6, xmax 20, ymax 30]"
    assert lines[-5:-2] == [
        f"{xml['000007']}: object 1 (car): box {box} has non-positive size (xmax < xmin)",
        f"{xml['000007']}: object 2 (unicorn): unknown class name 'unicorn'",
        f"{xml['000009']}: image file not found: {voc_root / 'JPEGImages' / '000009.jpg'}",
    ]
    assert lines[-2].startswith(f"{xml['000010']}: cannot read the XML (")
    box = "[xmin 5, ymin 5, xmax 52, ymax 30]"
    assert (
        lines[-1] == f"{xml['000012']}: object 1 (dog): box {box} extends outside the 50x40 image"
    )
    assert not out.exists() and not out.parent.exists()


def test_a_failed_conversion_leaves_the_old_output(voc_root: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "voc.json"
    code, _ = cli(
        "data", "voc2coco", "--voc-root", str(voc_root), "--split", "trainval", "--out", str(out)
    )
    assert code == 0
    clean = out.read_bytes()
    assert json.loads(clean)["annotations"][2]["bbox"] == [4.0, 5.0, 21.0, 25.0]
    plant_faults(voc_root)
    with pytest.raises(DatasetError, match=r"^5 problems in VOC trainval split"):
        voc_to_coco(voc_root, "trainval", out)
    assert out.read_bytes() == clean
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOCdevkit", "voc.json"]  # no temp file


def test_one_pixel_and_zero_based_boxes_convert(voc_root: Path, tmp_path: Path) -> None:
    """xmax == xmin is one pixel wide (VOC corners are inclusive); a box may reach 1 px
    past the 1..width image, as `data check` allows, so 0-based exports convert."""
    write_xml(
        voc_root,
        "000007",
        (50, 40),
        [obj_xml("car", (7, 0, 7, 40)), obj_xml("car", (0, 3, 51, 41))],
    )
    out = tmp_path / "edge.json"
    voc_to_coco(voc_root, "trainval", out)
    bboxes = [a["bbox"] for a in json.loads(out.read_text())["annotations"][2:]]
    assert bboxes == [[6.0, -1.0, 1.0, 41.0], [-1.0, 2.0, 52.0, 39.0]]
    check_coco(out, voc_root / "JPEGImages")
    write_xml(
        voc_root,
        "000007",
        (50, 40),
        [obj_xml("car", (-1, 3, 10, 10)), obj_xml("car", (1, 3, 10, 42))],
    )
    with pytest.raises(DatasetError) as info:
        voc_to_coco(voc_root, "trainval", out)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all("extends outside the 50x40 image" in ln for ln in lines[1:])
    assert lines[1].startswith(f"{voc_root / 'Annotations' / '000007.xml'}: object 0 (car): ")


def test_every_problem_of_one_object_is_named(voc_root: Path, tmp_path: Path) -> None:
    bad = obj_xml("unicorn", (20, 30, 10, 5), difficult=1).replace("<difficult>1<", "<difficult>x<")
    write_xml(voc_root, "000007", (50, 40), [bad])
    with pytest.raises(DatasetError) as info:
        voc_to_coco(voc_root, "trainval", tmp_path / "x.json")
    where = f"{voc_root / 'Annotations' / '000007.xml'}: object 0 (unicorn): "
    assert str(info.value).splitlines()[1:] == [
        f"{where}unknown class name 'unicorn'",
        f"{where}<difficult> 'x' is not an integer",
        f"{where}box [xmin 20, ymin 30, xmax 10, ymax 5] has non-positive size "
        "(xmax < xmin, ymax < ymin)",
    ]
