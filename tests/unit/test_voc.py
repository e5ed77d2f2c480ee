"""voc_to_coco on a tiny VOCdevkit written by the test."""

from __future__ import annotations

import json
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
