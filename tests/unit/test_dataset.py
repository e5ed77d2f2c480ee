"""CocoDetection targets, collate, and the augmentation presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detprune.data.coco import CocoDetection, collate
from detprune.data.synth import write_synthetic
from detprune.data.transforms import PRESETS, RandomHorizontalFlip, get_transform, hflip


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dataset")
    write_synthetic(out, seed=7, num_train=3, num_val=4)
    return out


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, Path]:
    """A hand-made COCO file: sparse category ids, grey and RGBA images, crowd, empty."""
    Image.new("L", (20, 10), 128).save(tmp_path / "grey.png")
    rgba = np.zeros((12, 16, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "empty.png")
    coco = {
        "images": [
            {"id": 30, "file_name": "rgba.png", "width": 16, "height": 12},
            {"id": 10, "file_name": "grey.png", "width": 20, "height": 10},
            {"id": 20, "file_name": "empty.png", "width": 8, "height": 8},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 3, 4], "area": 12,
             "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [5, 1, 10, 8], "area": 80,
             "iscrowd": 1},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0.5, 0, 2, 2], "area": 4,
             "iscrowd": 0},
            {"id": 4, "image_id": 30, "category_id": 3, "bbox": [2, 2, 4, 4], "area": 16,
             "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }  # fmt: skip
    ann = tmp_path / "mixed.json"
    ann.write_text(json.dumps(coco))
    return ann, tmp_path


def test_synthetic_targets_match_the_json(synth_dir: Path) -> None:
    ds = CocoDetection(synth_dir / "instances_val.json", synth_dir / "val")
    coco = json.loads((synth_dir / "instances_val.json").read_text())
    assert len(ds) == 4 and ds.ids == [1, 2, 3, 4]
    assert ds.num_classes == 6 and ds.cat_ids == [1, 2, 3, 4, 5, 6]
    assert ds.class_names == ["circle", "square", "triangle", "plus", "ring", "star"]
    assert ds.cat_to_label == {i: i for i in range(1, 7)} == ds.label_to_cat
    for index, image_id in enumerate(ds.ids):
        image, target = ds[index]
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        assert target["boxes"].dtype == torch.float32
        assert torch.equal(target["boxes"], expected)
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["image_id"] == image_id and type(target["image_id"]) is int
        assert target["area"].dtype == torch.float32
        assert target["area"].tolist() == [a["area"] for a in anns]
        assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].sum() == 0
        assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
        png = np.array(Image.open(synth_dir / "val" / f"{image_id - 1:06d}.png"))
        assert torch.equal(image, torch.from_numpy(png).permute(2, 0, 1).float() / 255)


def test_sparse_categories_grey_rgba_crowd_and_empty(mixed: tuple[Path, Path]) -> None:
    ann, root = mixed
    ds = CocoDetection(ann, root)
    assert ds.ids == [10, 20, 30] and ds.cat_ids == [3, 7]
    assert ds.cat_to_label == {3: 1, 7: 2} and ds.label_to_cat == {1: 3, 2: 7}
    assert ds.class_names == ["three", "seven"] and ds.num_classes == 2
    grey, target = ds[0]
    assert grey.shape == (3, 10, 20)
    assert torch.allclose(grey, torch.full((3, 10, 20), 128 / 255))
    assert target["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0], [0.5, 0.0, 2.5, 2.0]]
    assert target["labels"].tolist() == [2, 1]  # the crowd annotation is left out
    empty, target = ds[1]
    assert empty.shape == (3, 8, 8) and empty[2].min() == 1.0 and empty[0].max() == 0.0
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["area"].shape == (0,) and target["iscrowd"].shape == (0,)
    rgba, target = ds[2]
    assert rgba.shape == (3, 12, 16) and rgba[0].min() == 1.0 and rgba[1:].max() == 0.0
    assert target["image_id"] == 30


def test_transforms_are_applied(mixed: tuple[Path, Path]) -> None:
    ann, root = mixed
    seen: list[int] = []

    def mark(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        seen.append(target["image_id"])
        return image * 0, {**target, "marked": True}

    image, target = CocoDetection(ann, root, transforms=mark)[2]
    assert seen == [30] and target["marked"] and image.abs().sum() == 0


def test_collate(mixed: tuple[Path, Path]) -> None:
    ds = CocoDetection(*mixed)
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, tuple) and isinstance(targets, tuple)
    assert [t["image_id"] for t in targets] == [10, 20]
    assert images[0].shape == (3, 10, 20) and images[1].shape == (3, 8, 8)


def test_hflip_moves_boxes_and_pixels() -> None:
    image = torch.zeros(3, 4, 10)
    image[:, 1:3, 2:5] = 1.0  # the object covers columns 2..4
    target = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 10.0, 4.0]]), "id": 1}
    flipped, out = hflip(image, target)
    assert out["boxes"].tolist() == [[5.0, 1.0, 8.0, 3.0], [0.0, 0.0, 10.0, 4.0]]
    assert torch.equal(flipped, image[:, :, torch.arange(9, -1, -1)])
    assert flipped[:, 1:3, 5:8].min() == 1.0 and flipped.sum() == image.sum()  # cols 5..7
    assert out["id"] == 1
    assert target["boxes"][0].tolist() == [2.0, 1.0, 5.0, 3.0]  # the input is untouched
    back, again = hflip(flipped, out)
    assert torch.equal(back, image) and torch.equal(again["boxes"], target["boxes"])


def test_random_flip_follows_torch_seed() -> None:
    image = torch.arange(6.0).reshape(1, 1, 6)
    target = {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])}
    flip = get_transform("hflip", train=True)

    def decisions() -> list[bool]:
        return [bool(flip(image, target)[0][0, 0, 0] == 5.0) for _ in range(40)]

    torch.manual_seed(123)
    first = decisions()
    torch.manual_seed(123)
    assert decisions() == first
    assert 5 <= sum(first) <= 35  # both outcomes happen at p = 0.5
    always = RandomHorizontalFlip(1.0)(image, target)
    assert always[1]["boxes"].tolist() == [[5.0, 0.0, 6.0, 1.0]]
    never = RandomHorizontalFlip(0.0)(image, target)
    assert torch.equal(never[0], image)


def test_presets_and_eval_identity() -> None:
    assert {"none", "hflip"} <= set(PRESETS)
    image = torch.rand(3, 5, 7)
    target = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]])}
    torch.manual_seed(0)
    for preset in PRESETS:
        for _ in range(5):
            out_image, out_target = get_transform(preset, train=False)(image, target)
            assert out_image is image and out_target is target
    for _ in range(5):
        assert get_transform("none", train=True)(image, target)[0] is image


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'mosaic'.*hflip, none"):
        get_transform("mosaic", train=True)
