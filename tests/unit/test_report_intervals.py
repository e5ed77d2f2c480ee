"""Bootstrap intervals in the result tables and figures, from hand-built metrics records."""

from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from detprune.evaluation.bootstrap import delta_interval
from detprune.report.figures import _error_bars, plot_map_vs_flops
from detprune.report.tables import COLUMNS, build_table, load_records, to_markdown, write_table

RESAMPLES = 300
SHA = "ab" * 32
# what the test images do to every model alike on each resample: it cancels in a paired delta
IMAGE_EFFECT = np.random.default_rng(0).normal(0.0, 0.02, RESAMPLES)


def record(
    method: str,
    target: float,
    ap: float,
    *,
    seed: int = 0,
    detector: str = "fasterrcnn_narrow",
    noise: float = 0.002,
    sha: str = SHA,
) -> dict:
    own = np.random.default_rng(zlib.crc32(f"{method}/{target}/{seed}".encode()))
    vector = ap + IMAGE_EFFECT + own.normal(0.0, noise, RESAMPLES)
    return {
        "detector": detector,
        "method": method,
        "flops_target": target,
        "seed": seed,
        "split": "test",
        "metrics": {"AP": ap, "AP50": ap + 0.2},
        "cost": {"params": 1_000_000, "macs": int(400_000_000 * target)},
        "bootstrap": {
            "method": "paired percentile bootstrap over test images",
            "resamples": RESAMPLES,
            "seed": 0,
            "images": 500,
            "image_ids_sha256": sha,
            "AP": vector.tolist(),
            "AP_full": ap,
        },
    }


def classifier(method: str, target: float, top1: float) -> dict:
    return {
        "detector": "resnet_tiny",
        "method": method,
        "flops_target": target,
        "seed": 0,
        "split": "test",
        "metrics": {"top1": top1, "top5": 0.9},
        "cost": {"params": 1_000_000, "macs": int(1e8 * target)},
    }


def records() -> list[dict]:
    return [
        record("baseline", 1.0, 0.40),
        record("l1", 0.5, 0.350, seed=0),
        record("l1", 0.5, 0.352, seed=1),
        record("miep", 0.5, 0.380),  # clearly better than l1
        record("random", 0.5, 0.300),  # clearly worse
        record("taylor", 0.5, 0.3515),  # within noise
        record("scratch-l1", 0.5, 0.320),  # compared with l1, worse
        record("miep", 0.25, 0.33),  # no l1 row at 25 %
        classifier("baseline", 1.0, 0.70),
        classifier("l1", 0.5, 0.65),
    ]


def row(df: pd.DataFrame, method: str, target: float, detector: str = "fasterrcnn_narrow"):
    sel = df[(df["detector"] == detector) & (df["method"] == method)]
    sel = sel[sel["flops_target (%)"] == target * 100]
    assert len(sel) == 1
    return sel.iloc[0]


def test_columns_points_and_marks() -> None:
    df = build_table(records())
    assert list(df.columns) == list(COLUMNS)
    i = list(COLUMNS).index("ΔmAP")
    assert list(COLUMNS)[i : i + 8] == [
        "ΔmAP",
        "ΔmAP lo",
        "ΔmAP hi",
        "vs ref",
        "Δref",
        "Δref lo",
        "Δref hi",
        "mark",
    ]
    l1_mean = (35.0 + 35.2) / 2
    expected = {  # method -> (vs ref, Δref, mark)
        "miep": ("l1", 38.0 - l1_mean, "better"),
        "random": ("l1", 30.0 - l1_mean, "worse"),
        "taylor": ("l1", 35.15 - l1_mean, "within noise"),
        "scratch-l1": ("l1", 32.0 - l1_mean, "worse"),
    }
    for method, (ref, dref, text) in expected.items():
        r = row(df, method, 0.5)
        assert (r["vs ref"], r["mark"]) == (ref, text), method
        assert r["Δref"] == pytest.approx(dref)
        assert r["Δref lo"] < r["Δref"] < r["Δref hi"]
        assert r["ΔmAP lo"] < r["ΔmAP"] < r["ΔmAP hi"] < 0  # every pruned model loses mAP
    # paired: the image effect (sd 2 points) cancels, the interval is a fraction of a point
    miep = row(df, "miep", 0.5)
    assert miep["Δref hi"] - miep["Δref lo"] < 1.5
    assert miep["Δref lo"] > 0

    l1 = row(df, "l1", 0.5)
    assert (l1["vs ref"], l1["mark"]) == ("", "reference")
    assert math.isnan(l1["Δref"]) and math.isnan(l1["Δref lo"])
    assert l1["ΔmAP"] == pytest.approx(l1_mean - 40.0) and l1["seeds"] == 2

    base = row(df, "baseline", 1.0)
    assert (base["vs ref"], base["mark"], base["ΔmAP"]) == ("", "", 0.0)
    assert math.isnan(base["ΔmAP lo"]) and math.isnan(base["Δref"])

    alone = row(df, "miep", 0.25)  # its reference has no row at 25 %
    assert (alone["vs ref"], alone["mark"]) == ("l1", "")
    assert math.isnan(alone["Δref"]) and math.isnan(alone["Δref hi"])
    assert alone["ΔmAP hi"] < 0

    cls = row(df, "l1", 0.5, detector="resnet_tiny")  # no bootstrap: NaN intervals
    assert cls["mark"] == "reference" and math.isnan(cls["ΔmAP lo"])
    assert not df["mark"].isna().any() and not df["vs ref"].isna().any()


def test_interval_is_delta_interval_of_the_records_in_percent() -> None:
    recs = records()
    df = build_table(recs, level=0.9, seed=3)
    vec = {
        (r["method"], r["flops_target"], r["seed"]): np.array(r["bootstrap"]["AP"])
        for r in recs[:8]
    }
    lo, hi = delta_interval(
        [vec[("scratch-l1", 0.5, 0)]], [vec[("l1", 0.5, 0)], vec[("l1", 0.5, 1)]], level=0.9, seed=3
    )
    r = row(df, "scratch-l1", 0.5)
    assert (r["Δref lo"], r["Δref hi"]) == pytest.approx((100 * lo, 100 * hi), abs=1e-9)


def test_records_in_any_order_give_the_same_table() -> None:
    shuffled = records()
    random.Random(1).shuffle(shuffled)
    pd.testing.assert_frame_equal(build_table(shuffled), build_table(records()))


def test_another_reference() -> None:
    df = build_table(records(), reference="miep")
    assert row(df, "miep", 0.5)["mark"] == "reference"
    assert row(df, "l1", 0.5)["vs ref"] == "miep" and row(df, "l1", 0.5)["mark"] == "worse"
    assert row(df, "scratch-l1", 0.5)["vs ref"] == "l1"  # a control keeps its own method
    assert row(df, "random", 0.25 * 2)["vs ref"] == "miep"


def test_val_split_is_refused(tmp_path: Path) -> None:
    val = {**record("random", 0.5, 0.3), "split": "val"}
    with pytest.raises(ValueError, match=r"random.*held-out 'test' split \(never val\)"):
        build_table([*records(), val])
    path = tmp_path / "val.json"
    path.write_text(json.dumps(val), encoding="utf-8")
    with pytest.raises(ValueError, match=r"val\.json.*never val"):
        load_records([path])
    no_split = record("random", 0.5, 0.3)
    del no_split["split"]
    with pytest.raises(ValueError, match="missing key 'split'"):
        build_table([no_split])


def test_different_test_images_are_refused() -> None:
    other = record("random", 0.5, 0.3, sha="cd" * 32)
    recs = [r for r in records() if r["method"] != "random"] + [other]
    with pytest.raises(ValueError, match="'random' and 'baseline'.*different test images"):
        build_table(recs)
    short = record("random", 0.5, 0.3)
    short["bootstrap"]["AP"] = short["bootstrap"]["AP"][:10]
    with pytest.raises(ValueError, match="one AP per resample"):
        build_table([*records()[:1], short])


def test_markdown_latex_and_csv(tmp_path: Path) -> None:
    df = build_table(records())
    md = to_markdown(df)
    assert "±" in md and "| better" in md and "| worse" in md and "| within noise" in md
    miep = row(df, "miep", 0.5)
    half = (miep["Δref hi"] - miep["Δref lo"]) / 2
    assert f"{miep['Δref']:+.1f} ± {half:.1f}" in md
    assert f"{35.1:.1f} ± {np.std([35.0, 35.2], ddof=1):.1f}" in md  # mAP of l1, two seeds
    csv_path, _, tex_path = write_table(df, tmp_path / "t")
    csv = pd.read_csv(csv_path)
    assert list(csv.columns) == list(COLUMNS)
    for column in ("ΔmAP lo", "ΔmAP hi", "Δref", "Δref lo", "Δref hi", "mAP std"):
        assert pd.api.types.is_float_dtype(csv[column]), column
    assert csv["mark"].fillna("").tolist() == df["mark"].tolist()
    tex = tex_path.read_text(encoding="utf-8")
    assert "$\\pm$" in tex and "±" not in tex


def test_error_bars_follow_the_interval(tmp_path: Path) -> None:
    df = build_table(records())
    rows = df[(df["method"] == "miep") & (df["detector"] == "fasterrcnn_narrow")]
    bars, interval = _error_bars(rows)
    assert interval and bars.shape == (2, 2)
    np.testing.assert_allclose(bars[0], rows["ΔmAP"] - rows["ΔmAP lo"])
    np.testing.assert_allclose(bars[1], rows["ΔmAP hi"] - rows["ΔmAP"])
    cls = df[(df["method"] == "l1") & (df["detector"] == "resnet_tiny")]
    assert _error_bars(cls) == (None, False)  # no interval, one seed: no bar
    out = plot_map_vs_flops(df, tmp_path / "fig.png")
    assert out.read_bytes().startswith(b"\x89PNG")
