"""The claims ledger: config/claims.yaml (validated, its numbers stated in METHODS.md) and the
verdict of a claim on planted per-seed records, through to claims.{md,csv}."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from detprune import experiments as E
from detprune.cli import main as cli
from detprune.config import ConfigError
from detprune.report import ledger as L
from detprune.report.claims import Claim, load_all, load_claims, row_ref
from detprune.report.reported import load_reported
from tests.conftest import ROOT
from tests.unit.test_reported import METHODS, expected

FOI = "miep_t4/gfl/miep-tli-foi@10>miep-tli@10"  # TLI + FOI beats TLI (10 % FLOPs, GFL)
RESAMPLES = 1000


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # table specs are read from config/tables


@pytest.fixture(scope="module")
def loaded() -> tuple[dict[str, Claim], dict[str, E.TableSpec]]:
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return load_all(E.CLAIMS, E.REPORTED)
    finally:
        os.chdir(cwd)


# --- the data file ---------------------------------------------------------------------------


def test_the_claims_file_holds_the_papers_claims(loaded):
    claims, specs = loaded
    assert len(claims) == 46
    gfl = claims["miep_t1/gfl/miep@10>groupfisher@10"]
    assert (gfl.paper, gfl.direction, gfl.reported) == ("miep", ">", 2.0)
    assert (gfl.a.label, gfl.b.label, gfl.a.flops) == ("MIEP", "GroupFisher", 0.1)
    # +FOI and +IRI each help, at both targets; LCP > DCP; SAD after GCP (direction only)
    for pct, foi, iri in (("25", 0.3, 0.3), ("10", 1.2, 1.3)):
        assert claims[f"miep_t4/gfl/miep-tli-foi@{pct}>miep-tli@{pct}"].reported == foi
        assert claims[f"miep_t4/gfl/miep-tli-iri@{pct}>miep-tli@{pct}"].reported == iri
    assert claims["miep_t1/ssd/lcp@50>dcp@50"].reported == 0.1  # -1.0 vs -1.1 (own baselines)
    assert claims["lcp_ssd/ssd/lcp@53>dcp@53"].reported is None
    assert claims["gcp_yolov4/yolov4/gcp-sad@65.1>gcp@65.1"].reported is None
    assert {c.table for c in claims.values()} == set(specs) - {"miep_imagenet"}
    for c in claims.values():  # the source names the paper
        assert c.paper.upper() in c.source, c.id


def test_every_reported_difference_is_stated_in_methods(loaded):
    """a's change minus b's, both from METHODS.md's numbers; null only where it states none."""
    claims, _ = loaded
    stated = expected(METHODS.read_text())
    for c in claims.values():
        rows = [stated.get(r.reported) if r.reported else None for r in (c.a, c.b)]
        if any(r is None or r["pruned"] is None for r in rows):
            assert c.reported is None, c.id
            continue
        change = [r["pruned"] - r["baseline"] for r in rows]
        assert c.reported == pytest.approx(change[0] - change[1], abs=1e-9), c.id


def _doc() -> dict[str, Any]:
    return yaml.safe_load((ROOT / E.CLAIMS).read_text())


def _load(tmp_path: Path, entries: dict[str, Any]) -> dict[str, Claim]:
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"claims": entries}, sort_keys=False))
    specs = {name: E.load_table(name) for name in E.table_names()}
    return load_claims(path, specs, load_reported(E.REPORTED))


def test_a_bad_claims_file_names_every_problem_at_once(tmp_path):
    good = _doc()["claims"]
    foi = good[FOI]
    no_source = {k: v for k, v in foi.items() if k != "source"}
    entries = {
        "miep_t9/gfl/miep@10>miep-tli@10": {**foi, "table": "miep_t9", "a": "miep@10"},
        "miep_t4/gfl/miep-tli-foi@50>miep-tli@10": {**foi, "a": "miep-tli-foi@50"},
        FOI: no_source,
        "miep_t4/gfl/miep-tli@10>miep-tli-foi@10": {
            **foi,
            "a": "miep-tli@10",
            "b": "miep-tli-foi@10",
            "direction": "=>",
            "reported": "1.2",
        },
    }
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, entries)
    lines = str(err.value).splitlines()
    where = f"{tmp_path / 'claims.yaml'}: claim "
    assert lines == [
        f"{where}'miep_t9/gfl/miep@10>miep-tli@10': field 'table': unknown table 'miep_t9' "
        f"(known: {', '.join(E.table_names())})",
        f"{where}'miep_t4/gfl/miep-tli-foi@50>miep-tli@10': field 'a': no row "
        "'miep-tli-foi@50' of experiment 'gfl' in config/tables/miep_t4.yaml (miep-tli@25, "
        "miep-tli@10, miep-tli-foi@25, miep-tli-foi@10, miep-tli-iri@25, miep-tli-iri@10, "
        "miep@25, miep@10)",
        f"{where}'{FOI}': field 'source': missing",
        f"{where}'miep_t4/gfl/miep-tli@10>miep-tli-foi@10': field 'direction': must be one of "
        ">, >=",
    ]


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"reported": 1.3}, "reported", "config/reported.yaml gives 1.2"),
        ({"reported": None}, "reported", "is None, config/reported.yaml gives 1.2"),
        ({"reported": -1.2}, "reported", "does not go the claim's way (>)"),
        ({"paper": "fpgm"}, "paper", "unknown paper 'fpgm' (known: gcp, lcp, miep)"),
        ({"experiment": "ssd"}, "experiment", "not an experiment of table 'miep_t4' (gfl)"),
        ({"b": "miep-tli-foi@10"}, "b", "the same row as 'a'"),
        ({"a": "miep-tli-foi 10"}, "a", "must be a row as '<method>@<pct>'"),
        ({"source": " "}, "source", "must be a non-empty string"),
        ({"seeds": 3}, "seeds", "unknown field"),
        (
            {
                "table": "miep_imagenet",
                "experiment": "resnet50",
                "a": "miep@10",
                "b": "groupfisher@10",
            },
            "experiment",
            "its metric 'top1' has no per-image resamples, so no interval",
        ),
    ],
)
def test_a_bad_field_is_named(tmp_path, change, field, problem):
    entry = {**_doc()["claims"][FOI], **change}
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, {FOI: entry})
    msg = str(err.value)
    assert f"claim '{FOI}': field '{field}': " in msg and problem in msg, msg


def test_null_only_where_the_paper_gives_no_figures_and_the_id_follows_the_fields(tmp_path):
    gcp = "gcp_yolov4/yolov4/gcp-sad@65.1>gcp@65.1"
    entry = {**_doc()["claims"][gcp], "reported": 2.0}
    with pytest.raises(ConfigError, match="no reported figures .*: must be null"):
        _load(tmp_path, {gcp: entry})
    with pytest.raises(ConfigError, match="field 'id': .* expected 'gcp_yolov4/yolov4/gcp-sad"):
        _load(tmp_path, {"gcp-sad-beats-gcp": _doc()["claims"][gcp]})
    path = tmp_path / "twice.yaml"
    block = yaml.safe_dump({gcp: _doc()["claims"][gcp]})
    path.write_text("claims:\n" + "\n".join("  " + ln for ln in (block * 2).splitlines()))
    with pytest.raises(ConfigError, match="duplicate key"):
        load_claims(path, {}, {})


# --- verdicts on planted records -------------------------------------------------------------

BASE = np.random.default_rng(0).uniform(0.30, 0.34, RESAMPLES)  # per resample: image difficulty


def _record(method: str, seed: int, shift: float, noise: float, rng) -> dict[str, Any]:
    """A test-split record ``shift`` AP points above a 32.0 baseline, on every resample of the
    same test images (plus noise of sd ``noise`` AP points per resample)."""
    vector = BASE + shift / 100 + rng.normal(0.0, noise / 100, RESAMPLES)
    return {
        "detector": "gfl_narrow_fpn",
        "method": method,
        "flops_target": 0.1,
        "seed": seed,
        "split": "test",
        "metrics": {"AP": 0.32 + shift / 100},
        "cost": {"params": 1e5, "macs": 1e8},
        "bootstrap": {
            "AP": vector.tolist(),
            "resamples": RESAMPLES,
            "seed": 0,
            "image_ids_sha256": "same-test-images",
        },
    }


def _planted(shifts: list[float], noise: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Per seed, row a ``shift`` points above row b."""
    rng = np.random.default_rng(1)
    a = [_record("miep-tli-foi", s, shift, noise, rng) for s, shift in enumerate(shifts)]
    b = [_record("miep-tli", s, 0.0, noise, rng) for s in range(len(shifts))]
    return a, b


def test_a_claim_planted_true_false_or_even_gets_its_verdict(loaded):
    claims, _ = loaded
    claim = claims[FOI]
    up = L.judge(claim, *_planted([4.0, 5.0, 6.0]), "AP")
    assert up.verdict == "reproduced"
    assert (up.mean, up.std, up.seeds) == (pytest.approx(5.0), pytest.approx(1.0), 3)
    assert 4.0 - 1e-9 <= up.lo <= up.hi <= 6.0 + 1e-9  # seeds resampled: means of 4, 5, 6
    down = L.judge(claim, *_planted([-3.0, -2.0]), "AP")
    assert down.verdict == "contradicted"
    assert (down.mean, down.seeds) == (pytest.approx(-2.5), 2) and down.hi < 0
    even = L.judge(claim, *_planted([0.0, 0.0, 0.0], noise=0.01), "AP")
    assert even.verdict == "within noise"
    assert even.mean == 0.0 and even.lo < 0 < even.hi
    one = L.judge(claim, *_planted([2.0]), "AP")
    assert one.verdict == "reproduced" and one.seeds == 1 and math.isnan(one.std)
    # a "no worse" claim reads the same interval
    no_worse = dataclasses.replace(claim, direction=">=")
    assert L.judge(no_worse, *_planted([-3.0, -2.0]), "AP").verdict == "contradicted"
    assert L.judge(no_worse, *_planted([0.0] * 3, noise=0.01), "AP").verdict == "within noise"
    nothing = L.judge(claim, [], _planted([1.0])[1], "AP")
    assert (nothing.verdict, nothing.seeds, nothing.note) == ("not run", 0, "no records of a row")


def test_records_without_resamples_or_on_other_images_are_refused(loaded):
    claims, _ = loaded
    a, b = _planted([1.0, 1.0])
    del a[1]["bootstrap"]
    with pytest.raises(ValueError, match="row miep-tli-foi@10 seed 1: .* no 'bootstrap.AP'"):
        L.judge(claims[FOI], a, b, "AP")
    a, b = _planted([1.0])
    b[0]["bootstrap"]["image_ids_sha256"] = "other-images"
    with pytest.raises(ValueError, match="different test images"):
        L.judge(claims[FOI], a, b, "AP")


def _write_rows(
    results: Path, spec: E.TableSpec, experiment: str, shifts: dict[str, list[float]]
) -> None:
    """Records of the rows of ``experiment`` named in ``shifts`` (``method@pct`` -> per seed)."""
    rng = np.random.default_rng(2)
    for row in spec.rows:
        if row.experiment != experiment:
            continue
        for seed, shift in enumerate(shifts.get(row_ref(row), [])):
            p = Path(E.row_metrics({"results": str(results)}, spec, row, "mini", seed))
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(_record(row.method, seed, shift, 0.2, rng)))


T4 = {  # TLI + FOI 5 points above TLI, TLI + IRI 3 below, MIEP 3 above FOI; at 25 %: +3
    "miep-tli@10": [0.0] * 3,
    "miep-tli-foi@10": [4.0, 5.0, 6.0],
    "miep-tli-iri@10": [-3.0] * 3,
    "miep@10": [7.0, 8.0, 9.0],
    "miep-tli@25": [0.0] * 3,
    "miep-tli-foi@25": [3.0] * 3,
    "miep-tli-iri@25": [3.0] * 3,
    "miep@25": [6.0] * 3,
}
SSD50 = {f"{m}@50": [0.0] for m in ("miep", "uniform", "groupfisher", "depgraph", "fpgm")}
SSD50 |= {"lcp@50": [0.0], "dcp@50": [0.0]}  # all even: within noise


def test_a_run_gives_the_page_and_the_csv(loaded, tmp_path):
    claims, specs = loaded
    run = {"miep_t4": (0, 1, 2), "miep_t1": (0,)}
    _write_rows(tmp_path, specs["miep_t4"], "gfl", T4)
    _write_rows(tmp_path, specs["miep_t1"], "ssd", SSD50)
    mine = {
        k: v
        for k, v in claims.items()
        if v.table == "miep_t4" or k.startswith("miep_t1/ssd/miep@50") or v.table == "lcp_ssd"
    }
    main = {"results": str(tmp_path)}
    assert len(L.ledger_files(mine, specs, main, "mini", run)) == 8 * 3 + 7
    csv, md = tmp_path / "tables/mini/claims.csv", tmp_path / "tables/mini/claims.md"
    L.write_ledger(
        L.to_frame(L.evaluate(mine, specs, main, "mini", run), specs), csv, md, "mini", run
    )

    df = pd.read_csv(csv).set_index("claim")  # an empty cell: NaN
    assert list(df.columns) == list(L.COLUMNS[1:])
    foi = df.loc[FOI]
    assert (foi["verdict"], foi["Δpaper"], foi["Δrepro"], foi["Δrepro std"]) == (
        "reproduced", 1.2, 5.0, 1.0,
    )  # fmt: skip
    assert foi["seeds"] == 3 and 3.5 <= foi["Δrepro lo"] <= foi["Δrepro hi"] <= 6.5
    assert foi["comparison"] == "GFL R50 at 10%: TLI + FOI > TLI"
    assert df.loc["miep_t4/gfl/miep-tli-iri@10>miep-tli@10", "verdict"] == "contradicted"
    assert df.loc["miep_t4/gfl/miep@10>miep-tli-foi@10", "Δrepro"] == 3.0
    assert df.loc["miep_t1/ssd/miep@50>fpgm@50", "verdict"] == "within noise"
    chex = df.loc["miep_t1/ssd/miep@50>chex@50"]
    assert (chex["verdict"], chex["note"]) == (
        "not run", "missing: CHEX is not in the method registry",
    )  # fmt: skip
    assert (chex["seeds"], chex["Δpaper"]) == (0, 0.3) and math.isnan(chex["Δrepro"])
    lcp = df.loc["lcp_ssd/ssd/lcp@53>dcp@53"]
    assert (lcp["verdict"], lcp["note"]) == ("not run", "table not in this run")
    assert math.isnan(lcp["Δpaper"]) and math.isnan(df.loc[FOI, "note"])

    page = md.read_text()
    assert page.startswith("# Claims ledger, profile `mini`\n")
    assert "Tables run: miep_t4 (seeds 0, 1, 2), miep_t1 (seeds 0)." in page
    assert "Verdicts: reproduced 7, contradicted 1, within noise 6, not run 2." in page
    line = next(ln for ln in page.splitlines() if ln.startswith("| GFL R50 at 10%: TLI + FOI >"))
    lo, hi = foi["Δrepro lo"], foi["Δrepro hi"]
    assert line == (
        f"| GFL R50 at 10%: TLI + FOI > TLI | miep | +1.2 | +5.00 ± 1.00 (n=3) | "
        f"[+{lo:.2f}, +{hi:.2f}] | reproduced | {claims[FOI].source} |"
    )
    assert "| – | – | not run (table not in this run) |" in page


def test_the_cli_writes_the_ledger_of_a_run(loaded, tmp_path):
    claims, specs = loaded
    _write_rows(tmp_path, specs["miep_t4"], "gfl", {k: v[:2] for k, v in T4.items()})
    out = tmp_path / "tables/mini"
    cli(
        ["claims", "--profile", "mini", "--results", str(tmp_path), "--tables", "miep_t4:0,1",
         "--csv", str(out / "claims.csv"), "--md", str(out / "claims.md")]
    )  # fmt: skip
    df = pd.read_csv(out / "claims.csv").set_index("claim")
    assert df.loc[FOI, "verdict"] == "reproduced" and df.loc[FOI, "seeds"] == 2
    assert df.loc[FOI, "Δrepro"] == 4.5
    assert (df["verdict"] == "not run").sum() == len(claims) - 8
    assert "Tables run: miep_t4 (seeds 0, 1)." in (out / "claims.md").read_text()
    assert not list(out.glob(".*.tmp"))  # written through temporary files, none left
