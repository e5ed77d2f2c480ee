"""The synthetic shapes dataset: determinism, coverage of classes and sizes, COCO format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detprune.data import synth
from detprune.data.synth import CLASSES, size_range, write_synthetic

SMALL = {"num_train": 12, "num_val": 8, "num_test": 5}


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "seed3"
    summary = write_synthetic(out, seed=3, **SMALL)
    return out, summary


def load(out: Path, split: str) -> dict:
    return json.loads((out / f"instances_{split}.json").read_text())


def test_files_written(data: tuple[Path, dict]) -> None:
    out, _ = data
    names = sorted(tree_hashes(out))
    expected = ["instances_test.json", "instances_train.json", "instances_val.json"]
    expected += [f"train/{i:06d}.png" for i in range(12)]
    expected += [f"val/{i:06d}.png" for i in range(8)]
    expected += [f"test/{i:06d}.png" for i in range(5)]
    assert names == sorted(expected)
    assert not list(out.rglob("*.tmp"))


def test_test_split_is_held_out_and_leaves_train_and_val_as_they_were(
    data: tuple[Path, dict], tmp_path: Path
) -> None:
    """The test split comes from its own seed: adding it changes no train or val image,
    and none of its images is a val or train image."""
    out, _ = data
    write_synthetic(tmp_path / "no_test", seed=3, num_train=12, num_val=8)
    ours, before = tree_hashes(out), tree_hashes(tmp_path / "no_test")
    for name, digest in before.items():
        if name.endswith(".png"):
            assert ours[name] == digest, name
    test = {v for k, v in ours.items() if k.startswith("test/")}
    others = {v for k, v in ours.items() if k.startswith(("train/", "val/"))}
    assert len(test) == 5 and not test & others
    info = json.loads((out / "instances_test.json").read_text())["info"]
    assert info["split"] == "test" and info["split_seed"] == [3, 3]


def test_same_seed_is_byte_identical(data: tuple[Path, dict], tmp_path: Path) -> None:
    out, summary = data
    again = write_synthetic(tmp_path / "again", seed=3, **SMALL)
    assert tree_hashes(tmp_path / "again") == tree_hashes(out)
    assert again == summary


def test_other_seed_differs(data: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = data
    write_synthetic(tmp_path / "other", seed=4, **SMALL)
    ours, theirs = tree_hashes(out), tree_hashes(tmp_path / "other")
    assert ours.keys() == theirs.keys()
    differing = [name for name in ours if ours[name] != theirs[name]]
    assert sorted(differing) == sorted(ours)  # every file, every image differs


def test_train_and_val_use_different_seeds(data: tuple[Path, dict]) -> None:
    out, _ = data
    for i in range(8):
        train = np.asarray(Image.open(out / "train" / f"{i:06d}.png"))
        val = np.asarray(Image.open(out / "val" / f"{i:06d}.png"))
        assert not np.array_equal(train, val)


@pytest.mark.parametrize("split", ["train", "val"])
def test_split_covers_sizes_classes_and_crowded_images(data: tuple[Path, dict], split: str) -> None:
    out, _ = data
    coco = load(out, split)
    anns = coco["annotations"]
    sizes = {size_range(a["area"]) for a in anns}
    assert sizes == {"small", "medium", "large"}
    assert len({a["category_id"] for a in anns}) >= 5
    per_image: dict[int, int] = {}
    for a in anns:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert max(per_image.values()) >= 3
    assert sum(n >= 2 for n in per_image.values()) >= len(coco["images"]) // 2
    small = [a for a in anns if size_range(a["area"]) == "small"]
    assert min(min(a["bbox"][2:]) for a in small) >= 10  # small objects stay visible


def test_coco_structure(data: tuple[Path, dict]) -> None:
    out, _ = data
    coco = load(out, "val")
    assert coco["licenses"] == []
    info = coco["info"]
    assert info["seed"] == 3 and info["split"] == "val"
    assert info["num_val"] == 8 and info["image_size"] == 128
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(CLASSES) + 1))
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    assert {c["supercategory"] for c in coco["categories"]} == {"shape"}
    images = {img["id"]: img for img in coco["images"]}
    assert len(images) == 8
    for img in coco["images"]:
        assert set(img) == {"id", "file_name", "width", "height"}
        assert "/" not in img["file_name"] and img["width"] == img["height"] == 128
    ids = [a["id"] for a in coco["annotations"]]
    assert len(ids) == len(set(ids))
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert all(isinstance(v, float) for v in a["bbox"])
        assert a["area"] == w * h and a["iscrowd"] == 0
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
        assert a["image_id"] in images


def test_summary_matches_files(data: tuple[Path, dict]) -> None:
    out, summary = data
    for split in ("train", "val"):
        coco = load(out, split)
        assert summary[split]["images"] == len(coco["images"])
        assert summary[split]["annotations"] == len(coco["annotations"])
        per_class = {name: 0 for name in CLASSES}
        for a in coco["annotations"]:
            per_class[CLASSES[a["category_id"] - 1]] += 1
        assert summary[split]["per_class"] == per_class
        assert sum(summary[split]["per_size"].values()) == len(coco["annotations"])


def test_images_are_plain_rgb_pngs(data: tuple[Path, dict]) -> None:
    out, _ = data
    with Image.open(out / "val" / "000000.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (128, 128)
        assert not any(k in im.info for k in ("tEXt", "zTXt", "iTXt", "date:create"))
        pixels = np.asarray(im)
    assert pixels.std() > 20  # coloured content, not a flat image


def test_object_pixels_contrast_with_surroundings(data: tuple[Path, dict]) -> None:
    out, _ = data
    coco = load(out, "val")
    circles = [a for a in coco["annotations"] if a["category_id"] == 1 and a["area"] > 900]
    assert circles
    for a in circles:
        img = np.asarray(Image.open(out / "val" / f"{a['image_id'] - 1:06d}.png"), dtype=float)
        x, y, w, h = (int(v) for v in a["bbox"])
        centre = img[y + h // 2 - 1 : y + h // 2 + 2, x + w // 2 - 1 : x + w // 2 + 2]
        corner = img[y : y + 2, x : x + 2]  # outside the disc, inside its box
        assert np.linalg.norm(centre.mean((0, 1)) - corner.mean((0, 1))) > 25


@pytest.mark.parametrize("kind", CLASSES)
def test_rendered_shape_fills_its_nominal_size(kind: str) -> None:
    alpha = synth.render_shape(kind, 40.0, 0.0, np.zeros(2))
    assert alpha is not None
    ys, xs = np.nonzero(alpha >= 0.5)
    assert 38 <= max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) <= 41


def test_shapes_differ_in_geometry() -> None:
    fills = {
        kind: float((synth.render_shape(kind, 60.0, 0.0, np.zeros(2)) >= 0.5).mean())
        for kind in CLASSES
    }
    values = sorted(fills.values())
    assert min(b - a for a, b in zip(values, values[1:], strict=False)) > 0.01, fills


def test_stale_images_are_removed(tmp_path: Path) -> None:
    write_synthetic(tmp_path, seed=1, num_train=6, num_val=3)
    (tmp_path / "val" / "notes.txt").write_text("kept")
    write_synthetic(tmp_path, seed=1, num_train=3, num_val=3)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]
    assert (tmp_path / "val" / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize(
    "kwargs",
    [{"seed": -1}, {"image_size": 40}, {"min_objects": 0}, {"max_objects": 2}, {"num_val": -1}],
)
def test_bad_parameters_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        write_synthetic(tmp_path, **{**SMALL, **kwargs})
    assert not (tmp_path / "instances_train.json").exists()


def test_small_images_have_no_large_objects(tmp_path: Path) -> None:
    summary = write_synthetic(
        tmp_path, seed=3, num_train=4, num_val=6, image_size=64, min_objects=1, max_objects=3
    )
    for split in ("train", "val"):
        assert summary[split]["per_size"]["large"] == 0
        assert summary[split]["per_size"]["small"] > 0 and summary[split]["per_size"]["medium"] > 0
        assert min(summary[split]["per_class"].values()) >= 1
        coco = load(tmp_path, split)
        assert {(i["width"], i["height"]) for i in coco["images"]} == {(64, 64)}
        assert all(a["bbox"][0] + a["bbox"][2] <= 64 for a in coco["annotations"])


def test_size_range_thresholds() -> None:
    assert size_range(32**2 - 1) == "small"
    assert size_range(32**2) == "medium"
    assert size_range(96**2) == "medium"
    assert size_range(96**2 + 1) == "large"
