"""The papers' claims (``config/claims.yaml``): which row of a paper table beats which.

A claim names two rows of one experiment of a paper table (config/tables/<table>.yaml), a
direction (``>``: a beats b, ``>=``: a is no worse than b), the difference the paper reports
(a's change minus b's change, percent points; None where the paper states only the
direction) and where the paper makes it. :func:`load_claims` validates the file against
the table specs and the reported numbers and reports every problem at once.
:mod:`detprune.report.ledger` reads the claims against a table run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detprune.config import ConfigError
from detprune.experiments import REPORTED, TABLES_DIR, Row, TableSpec, load_table, table_names
from detprune.report.reported import Reported, UniqueKeyLoader, load_reported
from detprune.workflow import pct

#: The data file relative to the repository root: the CLI's default (the library takes a path).
DEFAULT_PATH = Path("config/claims.yaml")
DIRECTIONS: tuple[str, ...] = (">", ">=")
FIELDS: tuple[str, ...] = (
    "paper",
    "table",
    "experiment",
    "a",
    "b",
    "direction",
    "reported",
    "source",
)
#: Table metric -> the per-resample key of a record's ``bootstrap`` entry (the interval's data).
RESAMPLED: dict[str, str] = {"mAP": "AP", "AP50": "AP50"}
_ROW = re.compile(r"([a-z][a-z0-9_-]*)@([0-9]+(?:\.[0-9]+)?)")


@dataclass(frozen=True)
class Claim:
    """One claim: row ``a`` of ``table`` beats (``>``) or matches (``>=``) row ``b``."""

    id: str
    paper: str
    table: str
    experiment: str
    a: Row
    b: Row
    direction: str
    reported: float | None
    source: str


def claim_id(table: str, experiment: str, a: str, direction: str, b: str) -> str:
    """``<table>/<experiment>/<a><direction><b>``, rows as ``<method>@<pct>``."""
    return f"{table}/{experiment}/{a}{direction}{b}"


def row_ref(row: Row) -> str:
    """A table row as claims name it: ``<method>@<pct>``."""
    return f"{row.method}@{pct(row.flops)}"


def paper_difference(claim: Claim, reported: Mapping[str, Reported]) -> float | None:
    """a's reported change minus b's (percent points), None when a row has no figures."""
    changes = []
    for row in (claim.a, claim.b):
        rep = reported.get(row.reported) if row.reported else None
        if rep is None or rep.baseline is None or rep.pruned is None:
            return None
        changes.append(rep.pruned - rep.baseline)
    return round(changes[0] - changes[1], 2)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _find_row(spec: TableSpec, experiment: str, ref: Any) -> Row | str:
    """The row ``ref`` (``<method>@<pct>``) of ``experiment``, or the problem."""
    rows = [r for r in spec.rows if r.experiment == experiment]
    if not isinstance(ref, str) or not _ROW.fullmatch(ref):
        return f"must be a row as '<method>@<pct>', got {ref!r}"
    for row in rows:
        if row_ref(row) == ref:
            return row
    known = ", ".join(map(row_ref, rows))
    return f"no row {ref!r} of experiment {experiment!r} in {TABLES_DIR / spec.name}.yaml ({known})"


def _check_fields(raw: Any) -> list[tuple[str, str]]:
    if not isinstance(raw, dict):
        return [("*", f"must be a mapping, got {raw!r}")]
    problems = [(str(n), "unknown field") for n in raw if n not in FIELDS]
    problems += [(n, "missing") for n in FIELDS if n not in raw]
    for name in ("paper", "table", "experiment", "direction", "source"):
        if name in raw and (not isinstance(raw[name], str) or not raw[name].strip()):
            problems.append((name, f"must be a non-empty string, got {raw[name]!r}"))
    return problems


def _check_rows(
    raw: dict[str, Any], specs: Mapping[str, TableSpec]
) -> tuple[dict[str, Row], list[tuple[str, str]]]:
    """The rows ``a`` and ``b`` of the claim's table and experiment, and the problems."""
    spec = specs.get(raw["table"])
    if spec is None:
        return {}, [("table", f"unknown table {raw['table']!r} (known: {', '.join(specs)})")]
    if raw["experiment"] not in spec.experiments:
        known = ", ".join(spec.experiments)
        return {}, [("experiment", f"not an experiment of table {spec.name!r} ({known})")]
    rows, problems = {}, []
    for name in ("a", "b"):
        found = _find_row(spec, raw["experiment"], raw[name])
        if isinstance(found, str):
            problems.append((name, found))
        else:
            rows[name] = found
    if not problems and rows["a"] == rows["b"]:
        problems.append(("b", "the same row as 'a'"))
    metric = spec.metric_of(raw["experiment"])
    if metric not in RESAMPLED:
        problems.append(
            ("experiment", f"its metric {metric!r} has no per-image resamples, so no interval")
        )
    return rows, problems


def _check_reported(claim: Claim, reported: Mapping[str, Reported]) -> list[tuple[str, str]]:
    value, stated = claim.reported, paper_difference(claim, reported)
    if value is not None and not _is_number(value):
        return [("reported", f"must be a number or null, got {value!r}")]
    problems = []
    if value is not None and (value <= 0 if claim.direction == ">" else value < 0):
        problems.append(("reported", f"{value} does not go the claim's way ({claim.direction})"))
    if stated is None and value is not None:
        problems.append(
            ("reported", "a row has no reported figures in config/reported.yaml: must be null")
        )
    elif stated is not None and (value is None or not math.isclose(value, stated, abs_tol=1e-9)):
        rows = f"{claim.a.reported} minus {claim.b.reported}"
        problems.append(("reported", f"is {value!r}, config/reported.yaml gives {stated} ({rows})"))
    return problems


def _entry(
    cid: Any,
    raw: Any,
    specs: Mapping[str, TableSpec],
    reported: Mapping[str, Reported],
) -> tuple[Claim | None, list[tuple[str, str]]]:
    """The claim of one entry, or None, and its problems as (field, problem)."""
    problems = _check_fields(raw)
    if not isinstance(raw, dict):
        return None, problems
    bad = {name for name, _ in problems}
    papers = sorted({r.source for r in reported.values()})
    if "paper" not in bad and raw["paper"] not in papers:
        problems.append(("paper", f"unknown paper {raw['paper']!r} (known: {', '.join(papers)})"))
    if "direction" not in bad and raw["direction"] not in DIRECTIONS:
        problems.append(("direction", f"must be one of {', '.join(DIRECTIONS)}"))
    rows: dict[str, Row] = {}
    if not bad & {"table", "experiment", "a", "b"}:
        rows, row_problems = _check_rows(raw, specs)
        problems += row_problems
    if problems:
        return None, problems
    want = claim_id(raw["table"], raw["experiment"], raw["a"], raw["direction"], raw["b"])
    if cid != want:
        problems.append(("id", f"does not match its fields: expected {want!r}"))
    claim = Claim(
        want,
        raw["paper"],
        raw["table"],
        raw["experiment"],
        rows["a"],
        rows["b"],
        raw["direction"],
        raw["reported"],
        raw["source"].strip(),
    )
    problems += _check_reported(claim, reported)
    return (None if problems else claim), problems


def load_claims(
    path: str | Path, specs: Mapping[str, TableSpec], reported: Mapping[str, Reported]
) -> dict[str, Claim]:
    """Load and validate the claims file against the table specs (name -> spec) and the
    reported numbers; every problem is a line of one ConfigError naming file, claim, field."""
    p = Path(path)
    try:
        doc = yaml.load(p.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or set(doc) != {"claims"} or not isinstance(doc["claims"], dict):
        raise ConfigError(f"{p}: the top level must be a mapping with 'claims' only")
    claims, problems = {}, []
    for cid, raw in doc["claims"].items():
        claim, found = _entry(cid, raw, specs, reported)
        problems += [f"{p}: claim {cid!r}: field {name!r}: {why}" for name, why in found]
        if claim is not None:
            claims[claim.id] = claim
    if problems:
        raise ConfigError("\n".join(problems))
    return claims


def load_all(
    path: str | Path = DEFAULT_PATH, reported: str | Path = REPORTED
) -> tuple[dict[str, Claim], dict[str, TableSpec]]:
    """The validated claims and every table spec (name -> spec) they were checked against."""
    specs = {name: load_table(name) for name in table_names()}
    return load_claims(path, specs, load_reported(reported)), specs
