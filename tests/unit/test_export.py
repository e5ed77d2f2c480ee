"""`detprune export`: a baseline and an l1-pruned checkpoint to ONNX, checked by ONNX Runtime
on real images (issue 24, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from detprune.cli import main
from detprune.evaluation import export as ex
from detprune.models import build_model
from detprune.train import checkpoint
from tests.helpers import baseline_and_l1, synth

NAME = "fasterrcnn_narrow_fpn"
SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("export_data"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A baseline of the default run's detector and its l1 prune to ~10 % of the FLOPs
    (within 25 %, which keeps the bisection to a few trials)."""
    return baseline_and_l1(tmp_path_factory.mktemp("export_ckpts"), 0.1, SIZE)


def _images(data: Path, n: int) -> torch.Tensor:
    return ex.real_images(data / "instances_val.json", data / "val", SIZE, n)


def test_baseline_and_pruned_match_pytorch_and_pruned_file_is_smaller(ckpts, data, tmp_path):
    reports = {}
    for tag, ckpt in ckpts.items():
        out = tmp_path / f"{tag}.onnx"
        main(
            ["export", "--checkpoint", str(ckpt), "--ann", str(data / "instances_val.json")]
            + ["--images", str(data / "val"), "--out", str(out)]
        )
        reports[tag] = json.loads(ex.report_path(out).read_text())
        diffs = reports[tag]["validation"]["max_abs_diff"]
        assert len(diffs) == 12  # RPN objectness + deltas on 5 levels, box scores + deltas
        assert all(d["max_abs_diff"] <= d["allowed"] for d in diffs.values())
        assert reports[tag]["file_bytes"] == out.stat().st_size
        assert reports[tag]["checkpoint"] == str(ckpt)
    assert reports["l1"]["pruned"] and not reports["baseline"]["pruned"]
    assert (tmp_path / "l1.onnx").stat().st_size < 0.5 * (tmp_path / "baseline.onnx").stat().st_size

    # the batch axis is dynamic: three images through ONNX Runtime against PyTorch
    model, _ = checkpoint.load_model(ckpts["l1"])
    dense = ex.DenseExport(model.eval(), export=False)
    images = _images(data, 3)
    with torch.no_grad():
        ref = dense(images)
    session = ort.InferenceSession(str(tmp_path / "l1.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    assert got[0].shape[0] == 3 and got[-1].shape[0] == 6  # two reference boxes per image
    for a, t in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, t.numpy(), atol=ex.ATOL + ex.RTOL * t.abs().max().item())


@pytest.mark.parametrize("name", ["retinanet_narrow_fpn", "yolov4_tiny_narrow"])
def test_one_stage_families_export(name, data, tmp_path):
    torch.manual_seed(0)
    spec = checkpoint.model_spec(name, 3, {"image_size": SIZE})
    model = build_model(name, 3, spec["kwargs"])
    checkpoint.save(tmp_path / "m.pt", spec=spec, model=model, history=[], meta={})
    report = ex.export_onnx(tmp_path / "m.pt", tmp_path / "m.onnx", _images(data, 2))
    assert (tmp_path / "m.onnx").is_file() and report["validation"]["images"] == 2
    assert report["input"]["shape"] == ["batch", 3, SIZE, SIZE]


def test_truncated_checkpoint_fails_naming_the_file(ckpts, data, tmp_path, capsys):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(ckpts["baseline"].read_bytes()[:4096])
    with pytest.raises(ValueError, match="truncated.pt: not a readable detprune checkpoint"):
        ex.export_checkpoint(bad, tmp_path / "t.onnx", data / "instances_val.json", data / "val")
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["export", "--checkpoint", str(bad), "--ann", str(data / "instances_val.json")]
            + ["--images", str(data / "val"), "--out", str(tmp_path / "t.onnx")]
        )
    assert exit_info.value.code == 2 and f"export failed: {bad}" in capsys.readouterr().err
    assert not (tmp_path / "t.onnx").exists()


def test_a_mismatch_fails_saying_by_how_much(ckpts, data, tmp_path, monkeypatch):
    run = ort.InferenceSession.run

    def off(self, *args, **kwargs):  # a runtime that is 0.01 off on every output
        return [o + 0.01 for o in run(self, *args, **kwargs)]

    monkeypatch.setattr(ort.InferenceSession, "run", off)
    with pytest.raises(ex.ExportError, match=r"misses PyTorch on output \w+ by 0\.01"):
        ex.export_onnx(ckpts["baseline"], tmp_path / "b.onnx", _images(data, 2))
    assert not (tmp_path / "b.onnx").exists() and not ex.report_path(tmp_path / "b.onnx").exists()
