"""The tune split carved from a COCO training set: a deterministic partition."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from detprune.cli import main
from detprune.data.coco import DatasetError
from detprune.data.splits import FIELD, carve, carve_files


def _coco(n: int = 20) -> dict:
    images = [{"id": 100 + i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in range(n)]
    annotations = [
        {"id": k + 1, "image_id": 100 + k % n, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25}
        for k in range(3 * n - 2)  # the last two images get one box fewer
    ]
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
        "info": {"description": "test"},
        "licenses": [{"id": 1, "name": "x"}],
    }


def _ids(d: dict) -> set[int]:
    return {im["id"] for im in d["images"]}


def test_partition() -> None:
    ann = _coco()
    train, tune = carve(ann, 5, seed=0)
    assert len(_ids(tune)) == 5
    assert _ids(train).isdisjoint(_ids(tune))
    assert _ids(train) | _ids(tune) == _ids(ann)
    for part in (train, tune):
        assert all(a["image_id"] in _ids(part) for a in part["annotations"])
        assert part["categories"] == ann["categories"]
        assert part["licenses"] == ann["licenses"]
        assert part["info"]["description"] == "test"
    ann_ids = sorted(a["id"] for a in train["annotations"] + tune["annotations"])
    assert ann_ids == sorted(a["id"] for a in ann["annotations"])
    assert tune["info"]["carve"] == {"part": "tune", "seed": 0, "size": 5, "source_images": 20}
    assert "carve" not in ann["info"]  # the input is not modified


def test_seed_and_order() -> None:
    ann = _coco()
    tune0 = _ids(carve(ann, 5, seed=0)[1])
    assert _ids(carve(ann, 5, seed=0)[1]) == tune0
    assert _ids(carve(ann, 5, seed=1)[1]) != tune0
    shuffled = dict(ann, images=list(reversed(ann["images"])))
    shuffled["images"] = shuffled["images"][7:] + shuffled["images"][:7]
    assert _ids(carve(shuffled, 5, seed=0)[1]) == tune0


@pytest.mark.parametrize("size", [0, -1, 20, 21])
def test_bad_size(size: int) -> None:
    with pytest.raises(ValueError, match=rf"{FIELD}: {size} .*\(20\)"):
        carve(_coco(), size, seed=0)


def test_files_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "train.json"
    src.write_text(json.dumps(_coco()))
    outs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        tr, tu = tmp_path / name / "train.json", tmp_path / name / "tune.json"
        summary = carve_files(src, 6, seed, tr, tu)
        outs[name] = (tr.read_bytes(), tu.read_bytes())
    assert outs["a"] == outs["b"]
    assert outs["a"][1] != outs["c"][1]
    assert summary["images"] == {"train": 14, "tune": 6}
    tune = json.loads(outs["a"][1])
    assert tune["info"]["carve"]["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert tune["info"]["carve"]["seed"] == 3 and tune["info"]["carve"]["size"] == 6


def test_missing_or_bad_input_writes_nothing(tmp_path: Path) -> None:
    tr, tu = tmp_path / "out" / "train.json", tmp_path / "out" / "tune.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        carve_files(tmp_path / "nope.json", 2, 0, tr, tu)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json"):
        carve_files(bad, 2, 0, tr, tu)
    src = tmp_path / "train.json"
    src.write_text(json.dumps(_coco(4)))
    with pytest.raises(DatasetError, match=FIELD):
        carve_files(src, 4, 0, tr, tu)
    assert not tr.exists() and not tu.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_second_write_failure_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "train.json"
    src.write_text(json.dumps(_coco()))
    tr, tu = tmp_path / "train_part.json", tmp_path / "tune.json"
    real = Path.write_text

    def failing(self: Path, text: str, **kw) -> int:
        if self.name.startswith(".tune.json."):
            raise OSError("disk full")
        return real(self, text, **kw)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError, match="disk full"):
        carve_files(src, 5, 0, tr, tu)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.json"]


def test_cli(tmp_path: Path) -> None:
    src = tmp_path / "train.json"
    src.write_text(json.dumps(_coco()))
    tr, tu, log = tmp_path / "t.json", tmp_path / "u.json", tmp_path / "carve.log"
    outs = ["--size", "4", "--seed", "7", "--out-train", str(tr), "--out-tune", str(tu)]
    try:
        main(["data", "carve", "--ann", str(src), *outs, "--log", str(log)])
        assert len(json.loads(tu.read_text())["images"]) == 4
        assert len(json.loads(tr.read_text())["images"]) == 16
        assert "wrote" in log.read_text()
        with pytest.raises(SystemExit) as exc:
            main(["data", "carve", "--ann", str(tmp_path / "missing.json"), *outs])
        assert exc.value.code == 2
    finally:
        root = logging.getLogger()
        for h in list(root.handlers):  # main() installed them; close the --log file
            root.removeHandler(h)
            h.close()
