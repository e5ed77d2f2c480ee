"""The claims file: config/claims.yaml is validated and its numbers are stated in METHODS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from detprune import experiments as E
from detprune.config import ConfigError
from detprune.report.claims import Claim, load_all, load_claims
from detprune.report.reported import load_reported
from tests.conftest import ROOT
from tests.unit.test_reported import METHODS, expected

FOI = "miep_t4/gfl/miep-tli-foi@10>miep-tli@10"  # TLI + FOI beats TLI (10 % FLOPs, GFL)


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
