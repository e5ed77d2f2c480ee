"""The timing step (issue 24, item 2): every evaluated checkpoint of a seed timed in one
job, PyTorch and ONNX Runtime, median and IQR; the default table's speed-up columns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from detprune.cli import main
from detprune.data.classification import write_synthetic_classification
from detprune.evaluation.latency import interleaved, timed
from detprune.models import build_model
from detprune.report.speed import add_latency, latency_frame, load_latency
from detprune.report.tables import build_table
from detprune.train import checkpoint
from detprune.utils.io import file_sha256
from tests.conftest import ROOT
from tests.helpers import baseline_and_l1, synth

NAME = "fasterrcnn_narrow_fpn"
SIZE = 64


def _record(ckpt: Path, method: str, flops: float, detector: str = NAME) -> dict:
    """The keys of an evaluation record the timing step reads."""
    sha = file_sha256(ckpt)
    return {
        "detector": detector,
        "method": method,
        "flops_target": flops,
        "seed": 0,
        "checkpoint": {"path": str(ckpt), "sha256": sha},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A default-run detector's baseline and its l1 prune to ~25 % of the FLOPs, their
    metrics records, the test images and a config that times 3 runs after 1 warm-up."""
    root = tmp_path_factory.mktemp("latency")
    data = synth(root / "data")
    baseline_and_l1(root, 0.25, SIZE)
    paths = {"root": root, "ann": data / "instances_val.json", "images": data / "val"}
    for tag, flops in (("baseline", 1.0), ("l1", 0.25)):
        rec = root / f"metrics_{tag}.json"
        rec.write_text(json.dumps(_record(root / f"{tag}.pt", tag, flops)))
        paths[tag] = rec
    cfg = (ROOT / "config" / "config.yaml").read_text()
    cfg = cfg.replace("    runs: 100 ", "    runs: 3 ").replace("    warmup: 10", "    warmup: 1")
    (root / "config.yaml").write_text(cfg)
    paths["config"] = root / "config.yaml"
    return paths


def _time(run: dict[str, Path], out: Path, *metrics: Path) -> list[str]:
    return (
        ["time-latency", "--config", str(run["config"]), "--metrics", *map(str, metrics)]
        + ["--ann", str(run["ann"]), "--images", str(run["images"]), "--out", str(out)]
    )  # fmt: skip


def test_every_checkpoint_is_timed_in_pytorch_and_onnx_runtime(run):
    out = run["root"] / "latency.json"
    main(_time(run, out, run["baseline"], run["l1"]))
    record = json.loads(out.read_text())
    assert (record["batch"], record["threads"]) == (1, 2)
    assert record["malloc"] == {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30}
    assert record["provenance"]["config"]["evaluate"]["latency"]["runs"] == 3
    assert [(r["method"], r["flops_target"]) for r in record["rows"]] == [
        ("baseline", 1.0),
        ("l1", 0.25),
    ]
    for row in record["rows"]:
        assert row["checkpoint"]["sha256"] == file_sha256(row["checkpoint"]["path"])
        for kind in ("torch", "onnxruntime"):
            t = row[kind]
            assert (t["runs"], t["warmup"]) == (3, 1)
            assert 0 < t["min_ms"] <= t["median_ms"] and t["iqr_ms"] >= 0
        assert "torch_cuda_amp" not in row  # no GPU here
    base, pruned = record["rows"]
    # the exported network of the pruned checkpoint is the smaller file
    assert pruned["onnxruntime"]["onnx_bytes"] < 0.6 * base["onnxruntime"]["onnx_bytes"]

    # the default table reads it: latency, IQR and speed-up columns for both rows
    df = add_latency(_table(), load_latency([out]))
    l1 = df[df["method"] == "l1"].iloc[0]
    assert l1["speed-up"] == pytest.approx(
        base["torch"]["median_ms"] / pruned["torch"]["median_ms"]
    )
    assert l1["ORT (ms)"] == pytest.approx(pruned["onnxruntime"]["median_ms"])
    assert df[df["method"] == "baseline"].iloc[0]["ORT speed-up"] == pytest.approx(1.0)


def test_a_checkpoint_changed_since_evaluation_is_refused(run, tmp_path, capsys):
    rec = json.loads(run["l1"].read_text())
    rec["checkpoint"]["sha256"] = "0" * 64
    bad = tmp_path / "metrics_l1.json"
    bad.write_text(json.dumps(rec))
    out = tmp_path / "latency.json"
    with pytest.raises(SystemExit) as exc:
        main(_time(run, out, run["baseline"], bad))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}: checkpoint {rec['checkpoint']['path']} changed since it was evaluated" in err
    assert not out.exists()


def test_a_classifier_is_timed_whole_in_onnx_runtime(tmp_path):
    write_synthetic_classification(
        tmp_path / "cls", num_train=4, num_val=2, image_size=32, num_classes=2, seed=0
    )
    spec = checkpoint.model_spec("resnet_narrow_cls", 3, {"image_size": 32})
    model = build_model("resnet_narrow_cls", 3, spec["kwargs"]).eval()
    checkpoint.save(tmp_path / "cls.pt", spec=spec, model=model, history=[], meta={})
    rec = tmp_path / "m.json"
    rec.write_text(json.dumps(_record(tmp_path / "cls.pt", "baseline", 1.0, "resnet_narrow_cls")))
    cfg = (ROOT / "config" / "config.yaml").read_text()
    cfg = cfg.replace("    runs: 100 ", "    runs: 2 ").replace("    warmup: 10", "    warmup: 0")
    (tmp_path / "c.yaml").write_text(cfg)
    out = tmp_path / "latency.json"
    main(
        ["time-latency", "--config", str(tmp_path / "c.yaml"), "--metrics", str(rec)]
        + ["--ann", str(tmp_path / "cls" / "val"), "--images", str(tmp_path / "cls" / "val")]
        + ["--out", str(out)]
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["onnxruntime"]["runs"] == 2 and row["onnxruntime"]["onnx_bytes"] > 0


def test_interleaved_times_the_functions_in_round_robin_blocks():
    calls: list[str] = []
    fns = [lambda n=n: calls.append(n) for n in "abc"]
    out = interleaved(fns, warmup=1, runs=4, rounds=2)
    # one warm-up call each, then per round and function one untimed call and 2 timed ones
    assert "".join(calls) == "abc" + "aaabbbccc" * 2
    assert [(o["runs"], o["warmup"], o["rounds"]) for o in out] == [(4, 1, 2)] * 3
    calls.clear()
    (one,) = interleaved(fns[:1], warmup=0, runs=2, rounds=5)  # never more rounds than runs
    assert (one["runs"], one["rounds"], "".join(calls)) == (2, 2, "aaaa")


def test_timed_reports_median_and_interquartile_range_of_the_runs(monkeypatch):
    import detprune.evaluation.latency as lat

    calls = []
    clock = iter([0.0, 0.001, 0.0, 0.003, 0.0, 0.002, 0.0, 0.010, 0.0, 0.004])
    monkeypatch.setattr(lat.time, "perf_counter", lambda: next(clock))
    out = timed(lambda: calls.append(1), warmup=2, runs=5)
    assert len(calls) == 8  # 2 warm-up + 1 untimed at the block's start + 5 timed
    # runs of 1, 3, 2, 10, 4 ms: median 3, quartiles 2 and 4 (inclusive method)
    assert out["median_ms"] == pytest.approx(3.0)
    assert out["iqr_ms"] == pytest.approx(2.0)
    assert out["min_ms"] == pytest.approx(1.0)


def _table() -> pd.DataFrame:
    """A default-style table of two rows (baseline, l1 at 25 %) of one seed."""

    def rec(method: str, flops: float, macs: float) -> dict:
        return {
            "detector": NAME,
            "method": method,
            "flops_target": flops,
            "seed": 0,
            "split": "test",
            "metrics": {"AP": 0.5},
            "cost": {"params": 1e6, "macs": macs},
        }

    return build_table([rec("baseline", 1.0, 4e8), rec("l1", 0.25, 1e8)])


def _timing(seed: int, base_ms: float, row_ms: float, ort: bool = True) -> dict:
    def row(method: str, flops: float, ms: float) -> dict:
        t = {"median_ms": ms, "iqr_ms": ms / 10}
        return {
            "detector": NAME,
            "method": method,
            "flops_target": flops,
            "seed": seed,
            "torch": t,
            **({"onnxruntime": {"median_ms": ms / 2, "iqr_ms": 0.1}} if ort else {}),
        }

    return {"rows": [row("baseline", 1.0, base_ms), row("l1", 0.25, row_ms)]}


def test_speed_up_is_a_ratio_within_each_timing_record_then_averaged_over_seeds():
    # seed 0 on a fast minute, seed 1 on a slow one: speed-ups 2.0 and 4.0 -> 3.0,
    # whereas the ratio of the mean latencies would be 30 / 12.5 = 2.4
    frame = latency_frame([_timing(0, 20.0, 10.0), _timing(1, 40.0, 10.0)])
    l1 = frame[frame["method"] == "l1"].iloc[0]
    assert l1["speed-up"] == pytest.approx(3.0)
    assert l1["latency (ms)"] == pytest.approx(10.0)
    assert l1["ORT speed-up"] == pytest.approx(3.0)
    df = add_latency(_table(), [_timing(0, 20.0, 10.0), _timing(1, 40.0, 10.0)])
    assert list(df.columns[-7:]) == [
        "latency (ms)",
        "latency IQR (ms)",
        "speed-up",
        "ORT (ms)",
        "ORT IQR (ms)",
        "ORT speed-up",
        "seeds",
    ]
    assert df[df["method"] == "baseline"].iloc[0]["latency (ms)"] == pytest.approx(30.0)


def test_without_timing_records_the_columns_are_empty_and_the_table_unchanged():
    df = add_latency(_table(), [])
    assert all(math.isnan(v) for v in df["speed-up"]) and all(math.isnan(v) for v in df["ORT (ms)"])
    base = _table()
    assert df[list(base.columns)].equals(base)


def test_malformed_timing_records_name_the_file_and_the_key(tmp_path: Path):
    bad = _timing(0, 20.0, 10.0)
    del bad["rows"][1]["torch"]
    p = tmp_path / "latency.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"{p}: rows\[1\] lacks 'torch.median_ms'"):
        load_latency([p])
    nobase = _timing(0, 20.0, 10.0)
    nobase["rows"] = nobase["rows"][1:]
    p.write_text(json.dumps(nobase))
    with pytest.raises(ValueError, match=f"{p}: no baseline row"):
        load_latency([p])
