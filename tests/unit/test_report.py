"""Tables and figures built from hand-made metrics records."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest

from detprune.report.figures import plot_channels_per_layer, plot_map_vs_flops
from detprune.report.tables import COLUMNS, build_table, load_records, write_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(
    method: str,
    target: float,
    ap: float,
    macs: int,
    *,
    seed: int = 0,
    detector: str = "fasterrcnn_narrow",
    apl: float | None = 0.5,
) -> dict:
    return {
        "detector": detector,
        "method": method,
        "flops_target": target,
        "seed": seed,
        "split": "test",
        "metrics": {
            "AP": ap,
            "AP50": ap + 0.2,
            "AP75": ap - 0.1,
            "APs": 0.1,
            "APm": 0.3,
            "APl": apl,
            "AR100": 0.6,
        },
        "cost": {
            "params": 2_500_000,
            "macs": macs,
            "input_size": [128, 128],
            "latency_ms": 10.0,
            "latency_device": "cpu",
        },
        "provenance": {"git": "abc"},
    }


def records() -> list[dict]:
    return [
        record("l1", 0.25, 0.25, 100_000_000),
        record("l1", 0.5, 0.35, 200_000_000, seed=0),
        record("random", 0.5, 0.30, 190_000_000, apl=None),
        record("baseline", 1.0, 0.40, 400_000_000),
        record("l1", 0.5, 0.33, 220_000_000, seed=1),
        record("l1", 0.5, 0.20, 50_000_000, detector="fasterrcnn_wide"),  # no baseline
    ]


def row(df: pd.DataFrame, detector: str, method: str, target_percent: float) -> pd.Series:
    sel = df[
        (df["detector"] == detector)
        & (df["method"] == method)
        & (df["flops_target (%)"] == target_percent)
    ]
    assert len(sel) == 1
    return sel.iloc[0]


def test_build_table_values_and_order() -> None:
    df = build_table(records())
    assert list(df.columns) == list(COLUMNS)
    assert list(zip(df["detector"], df["method"], df["flops_target (%)"], strict=True)) == [
        ("fasterrcnn_narrow", "baseline", 100.0),
        ("fasterrcnn_narrow", "l1", 50.0),
        ("fasterrcnn_narrow", "l1", 25.0),
        ("fasterrcnn_narrow", "random", 50.0),
        ("fasterrcnn_wide", "l1", 50.0),
    ]
    base = row(df, "fasterrcnn_narrow", "baseline", 100.0)
    assert base["mAP"] == pytest.approx(40.0)
    assert base["ΔmAP"] == 0.0
    assert base["flops_kept (%)"] == 100.0
    assert base["GMACs"] == pytest.approx(0.4)
    assert base["params (M)"] == pytest.approx(2.5)
    assert base["seeds"] == 1 and math.isnan(base["mAP std"])

    l1_25 = row(df, "fasterrcnn_narrow", "l1", 25.0)
    assert l1_25["flops_kept (%)"] == pytest.approx(25.0)
    assert l1_25["ΔmAP"] == pytest.approx(0.25 * 100 - 0.40 * 100)
    assert l1_25["AP50"] == pytest.approx(45.0)

    # Two seeds: mean and sample std of exactly those two values.
    l1_50 = row(df, "fasterrcnn_narrow", "l1", 50.0)
    assert l1_50["seeds"] == 2
    assert l1_50["mAP"] == pytest.approx(34.0)
    assert l1_50["mAP std"] == pytest.approx(statistics.stdev([35.0, 33.0]))
    assert l1_50["mAP std"] == pytest.approx(math.sqrt(2.0))
    assert l1_50["ΔmAP"] == pytest.approx(34.0 - 40.0)
    assert l1_50["flops_kept (%)"] == pytest.approx(210_000_000 / 400_000_000 * 100)
    assert l1_50["GMACs"] == pytest.approx(0.21)

    rnd = row(df, "fasterrcnn_narrow", "random", 50.0)
    assert math.isnan(rnd["APl"])
    assert rnd["flops_kept (%)"] == pytest.approx(47.5)

    wide = row(df, "fasterrcnn_wide", "l1", 50.0)
    assert math.isnan(wide["ΔmAP"]) and math.isnan(wide["flops_kept (%)"])
    assert wide["mAP"] == pytest.approx(20.0)


def test_duplicate_seed_is_rejected() -> None:
    with pytest.raises(ValueError, match="several records"):
        build_table([*records(), record("baseline", 1.0, 0.41, 400_000_000)])


def test_write_table(tmp_path: Path) -> None:
    df = build_table(records())
    paths = write_table(df, tmp_path / "out" / "table")
    assert [p.name for p in paths] == ["table.csv", "table.md", "table.tex"]
    assert all(p.is_file() for p in paths)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)

    csv = pd.read_csv(paths[0])
    assert list(csv.columns) == list(COLUMNS)
    assert len(csv) == 5
    assert csv.loc[0, "method"] == "baseline"
    assert csv.loc[0, "mAP"] == 40.0
    assert csv.loc[1, "mAP"] == 34.0
    assert csv.loc[1, "mAP std"] == 1.4
    assert csv.loc[1, "ΔmAP"] == -6.0
    assert csv.loc[1, "flops_kept (%)"] == 52.5
    assert csv.loc[1, "seeds"] == 2
    assert csv.loc[1, "GMACs"] == 0.21
    assert math.isnan(csv.loc[4, "ΔmAP"]) and math.isnan(csv.loc[0, "mAP std"])
    assert math.isnan(csv.loc[3, "APl"])

    md = paths[1].read_text(encoding="utf-8").splitlines()
    assert len(md) == 2 + len(df)
    assert md[0].startswith("| detector") and "ΔmAP" in md[0]
    assert re.fullmatch(r"\|( :?-+:? \|)+", md[1])
    assert all(line.startswith("| ") and line.endswith(" |") for line in md)
    assert " 34.0 ± 1.4 " in md[3] and " -6.0 " in md[3]
    assert "mAP std" not in md[0] and "ΔmAP lo" not in md[0] and "Δref" in md[0]
    assert "–" in md[-1]  # NaN ΔmAP of the detector without baseline

    tex = paths[2].read_text(encoding="utf-8")
    # mAP std and the four lo/hi columns are folded into "mean ± spread" cells
    assert tex.startswith("\\begin{tabular}{llrrrrrrrrrrrlrlr}")
    assert "34.0 $\\pm$ 1.4" in tex
    for token in ("\\toprule", "\\midrule", "\\bottomrule", "\\end{tabular}"):
        assert token in tex
    assert "fasterrcnn\\_narrow" in tex and "flops\\_target (\\%)" in tex
    assert "$\\Delta$mAP" in tex
    assert "fasterrcnn_narrow" not in tex
    body = tex.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    assert len(body) == len(df) and all(line.endswith("\\\\") for line in body)


def test_load_records(tmp_path: Path) -> None:
    paths = []
    for i, rec in enumerate(records()):
        p = tmp_path / f"m{i}.json"
        p.write_text(json.dumps(rec), encoding="utf-8")
        paths.append(p)
    assert load_records(paths) == records()

    broken = records()[0]
    del broken["metrics"]
    bad = tmp_path / "broken_metrics.json"
    bad.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken_metrics\.json.*'metrics'"):
        load_records([*paths, bad])

    no_macs = records()[0]
    del no_macs["cost"]["macs"]
    bad.write_text(json.dumps(no_macs), encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken_metrics\.json.*cost\.macs"):
        load_records([bad])


def assert_png(path: Path) -> bytes:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)
    return data


def test_plot_map_vs_flops(tmp_path: Path) -> None:
    df = build_table(records())
    out = plot_map_vs_flops(df, tmp_path / "fig" / "map_vs_flops.png", title="COCO subset")
    first = assert_png(out)
    again = plot_map_vs_flops(df, tmp_path / "again.png", title="COCO subset")
    assert again.read_bytes() == first  # deterministic
    single = build_table([r for r in records() if r["detector"] == "fasterrcnn_narrow"])
    assert_png(plot_map_vs_flops(single, tmp_path / "single.png"))
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["map_vs_flops.png"]


def test_plot_channels_per_layer(tmp_path: Path) -> None:
    names = [f"backbone.body.layer{i}.0.conv{j}" for i in range(1, 4) for j in (1, 2)]
    originals = [16, 16, 32, 32, 64, 64]
    channel_records = []
    for method, scale in (("l1", 1.0), ("random", 0.8)):
        for target in (0.5, 0.25):
            layers = {
                n: [max(1, int(o * target * scale)), o]
                for n, o in zip(names, originals, strict=True)
            }
            channel_records.append({"method": method, "flops_target": target, "layers": layers})
    out = plot_channels_per_layer(channel_records, tmp_path / "channels.png", title="kept")
    assert out == tmp_path / "channels.png"
    assert_png(out)

    bad = [{"method": "l1", "flops_target": 0.5, "layers": {"a": [5, 4]}}]
    with pytest.raises(ValueError, match="kept=5"):
        plot_channels_per_layer(bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_short_layer_names_stay_distinct() -> None:
    from detprune.report.figures import _short_names

    names = ["backbone.body.layer1.0.conv1", "roi_heads.box_head.fc6", "a.x.conv1", "b.x.conv1"]
    assert _short_names(names) == ["body.layer1.0.conv1", "box_head.fc6", "a.x.conv1", "b.x.conv1"]
