"""The claims ledger of a table run: per claim the paper's difference, the reproduced one and
a verdict (``results/tables/<profile>/claims.{md,csv}``).

The reproduced difference of a claim ``a > b`` is, per training seed, a's metric minus b's
(both rows of one experiment, pruned from that seed's baseline): its mean, sample standard
deviation and count over the table's seeds. Its 95 % interval resamples the seeds of each
side and the test images together (:func:`detprune.evaluation.bootstrap.delta_interval`,
images paired: every record of the experiment is scored on the same resamples). Verdict:
``reproduced`` when the interval lies above 0, ``contradicted`` when below, ``within noise``
otherwise, for ``>`` and ``>=`` claims alike; ``not run`` when a row has no records in the
run (its table was not run, or the row is marked missing).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detprune.evaluation.bootstrap import delta_interval, mark
from detprune.experiments import REPORTED, TableSpec, load_table, parse_seeds, row_metrics
from detprune.report.claims import RESAMPLED, Claim, load_all, row_ref
from detprune.report.tables import load_records
from detprune.utils.io import atomic_path, write_text

VERDICTS: dict[str, str] = {
    "better": "reproduced",
    "worse": "contradicted",
    "within noise": "within noise",
}
NOT_RUN = "not run"
LEVEL = 0.95
COLUMNS: tuple[str, ...] = (
    "claim",
    "paper",
    "table",
    "comparison",
    "direction",
    "Δpaper",
    "Δrepro",
    "Δrepro std",
    "seeds",
    "Δrepro lo",
    "Δrepro hi",
    "verdict",
    "note",
    "source",
)
Record = Mapping[str, Any]


@dataclass(frozen=True)
class Outcome:
    """A claim read against a run; differences in percent points (NaN when not run)."""

    claim: Claim
    mean: float = math.nan
    std: float = math.nan
    seeds: int = 0
    lo: float = math.nan
    hi: float = math.nan
    verdict: str = NOT_RUN
    note: str = ""


def _vectors(records: Sequence[Record], field: str, side: str) -> tuple[list[np.ndarray], set]:
    """Per seed the per-resample ``field`` values, and the resamplings they were drawn on."""
    vectors, shared = [], set()
    for rec in records:
        boot = rec.get("bootstrap") or {}
        if field not in boot:
            raise ValueError(
                f"row {side} seed {rec.get('seed')}: its record has no 'bootstrap.{field}'"
            )
        vectors.append(np.asarray(boot[field], dtype=float))
        shared.add((boot.get("image_ids_sha256"), boot.get("resamples"), boot.get("seed")))
    return vectors, shared


def judge(
    claim: Claim,
    a: Sequence[Record],
    b: Sequence[Record],
    field: str,
) -> Outcome:
    """The outcome of ``claim`` on the records of its rows (one per seed, same seed order);
    ``field``: the metric's key in ``metrics`` and ``bootstrap``."""
    if not a or not b:
        return Outcome(claim, note="no records of a row")
    if len(a) != len(b):
        raise ValueError(f"claim {claim.id}: {len(a)} seeds of a, {len(b)} of b")
    diffs = [
        100.0 * (ra["metrics"][field] - rb["metrics"][field]) for ra, rb in zip(a, b, strict=True)
    ]
    va, meta_a = _vectors(a, field, row_ref(claim.a))
    vb, meta_b = _vectors(b, field, row_ref(claim.b))
    if len(meta_a | meta_b) != 1:
        raise ValueError(
            f"claim {claim.id}: its records were bootstrapped on different test images, "
            f"resample counts or seeds: {sorted(map(str, meta_a | meta_b))}"
        )
    lo, hi = (100.0 * x for x in delta_interval(va, vb, level=LEVEL))
    return Outcome(
        claim,
        mean=statistics.fmean(diffs),
        std=statistics.stdev(diffs) if len(diffs) > 1 else math.nan,
        seeds=len(diffs),
        lo=lo,
        hi=hi,
        verdict=VERDICTS[mark(lo, hi)],
    )


def claim_files(
    claim: Claim, main: Mapping[str, Any], spec: TableSpec, profile: str, seeds: Sequence[int]
) -> tuple[list[str], list[str]]:
    """The metrics records of rows a and b, per seed (none for a row marked missing)."""
    if claim.a.missing or claim.b.missing:
        return [], []
    a, b = ([row_metrics(main, spec, row, profile, s) for s in seeds] for row in (claim.a, claim.b))
    return a, b


def ledger_files(
    claims: Mapping[str, Claim],
    specs: Mapping[str, TableSpec],
    main: Mapping[str, Any],
    profile: str,
    run: Mapping[str, Sequence[int]],
) -> list[str]:
    """Every record the ledger reads: the rows of the claims of the run's tables (name ->
    seeds). The claims rule's inputs."""
    files: list[str] = []
    for c in claims.values():
        if c.table in run:
            a, b = claim_files(c, main, specs[c.table], profile, run[c.table])
            files += a + b
    return list(dict.fromkeys(files))


def evaluate(
    claims: Mapping[str, Claim],
    specs: Mapping[str, TableSpec],
    main: Mapping[str, Any],
    profile: str,
    run: Mapping[str, Sequence[int]],
) -> list[Outcome]:
    """Every claim's outcome on the run's tables (name -> seeds); the others are not run."""
    out = []
    for c in claims.values():
        missing = c.a.missing or c.b.missing
        if c.table not in run or missing:
            note = f"missing: {missing}" if missing else "table not in this run"
            out.append(Outcome(c, note=note))
            continue
        spec = specs[c.table]
        a, b = claim_files(c, main, spec, profile, run[c.table])
        field = RESAMPLED[spec.metric_of(c.experiment)]
        out.append(judge(c, load_records(a), load_records(b), field))
    return out


def comparison(claim: Claim, spec: TableSpec) -> str:
    """The claim in the table's words: ``GFL R50 at 10%: MIEP > GroupFisher``."""
    label = spec.experiments[claim.experiment]["label"]
    a, b = claim.a, claim.b
    at_a, at_b = (f"{row_ref(r).split('@')[1]}%" for r in (a, b))
    if at_a == at_b:
        return f"{label} at {at_a}: {a.label} {claim.direction} {b.label}"
    return f"{label}: {a.label} at {at_a} {claim.direction} {b.label} at {at_b}"


def to_frame(outcomes: Sequence[Outcome], specs: Mapping[str, TableSpec]) -> pd.DataFrame:
    """One line per claim (the csv's columns), numbers in percent points."""
    lines = []
    for o in outcomes:
        c = o.claim
        lines.append(
            {
                "claim": c.id,
                "paper": c.paper,
                "table": c.table,
                "comparison": comparison(c, specs[c.table]),
                "direction": c.direction,
                "Δpaper": math.nan if c.reported is None else c.reported,
                "Δrepro": o.mean,
                "Δrepro std": o.std,
                "seeds": o.seeds,
                "Δrepro lo": o.lo,
                "Δrepro hi": o.hi,
                "verdict": o.verdict,
                "note": o.note,
                "source": c.source,
            }
        )
    return pd.DataFrame(lines, columns=list(COLUMNS))


def _num(value: float, signed: bool = True, decimals: int = 2) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def _repro(row: Mapping[str, Any]) -> str:
    if row["seeds"] == 0:
        return "–"
    return f"{_num(row['Δrepro'])} ± {_num(row['Δrepro std'], signed=False)} (n={row['seeds']})"


def to_markdown(df: pd.DataFrame, profile: str, run: Mapping[str, Sequence[int]]) -> str:
    """The claims page: what was run, the verdict counts and rule, one line per claim."""
    counts = Counter(df["verdict"])
    order = (*VERDICTS.values(), NOT_RUN)
    tables = ", ".join(f"{t} (seeds {', '.join(map(str, s))})" for t, s in run.items())
    lines = [
        f"# Claims ledger, profile `{profile}`",
        "",
        f"Tables run: {tables or 'none'}.",
        "",
        "Verdicts: " + ", ".join(f"{v} {counts.get(v, 0)}" for v in order) + ".",
        "",
        "Δ = a's change minus b's, percent points (test split). Δrepro: mean ± std over "
        f"seeds of a - b; interval: {LEVEL:.0%}, seeds and test images resampled together. "
        "Reproduced: interval above 0; contradicted: below 0; within noise: it holds 0 "
        "(for `>` and `>=` claims alike); not run: a row has no records in this run.",
        "",
        "| claim | paper | Δpaper | Δrepro | 95 % interval | verdict | source |",
        "|---|---|--:|--:|--:|---|---|",
    ]
    for _, r in df.iterrows():
        ci = (
            "–"
            if math.isnan(r["Δrepro lo"])
            else f"[{_num(r['Δrepro lo'])}, {_num(r['Δrepro hi'])}]"
        )
        verdict = f"{r['verdict']} ({r['note']})" if r["note"] else r["verdict"]
        cells = [
            r["comparison"],
            r["paper"],
            _num(r["Δpaper"], decimals=1),  # as the papers state them
            _repro(r),
            ci,
            verdict,
            r["source"],
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_ledger(
    df: pd.DataFrame,
    csv: str | Path,
    md: str | Path,
    profile: str,
    run: Mapping[str, Sequence[int]],
) -> list[Path]:
    """Write the csv (numbers to 2 decimals, empty when missing) and the page, atomically."""
    with atomic_path(csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.2f", lineterminator="\n", encoding="utf-8")
    write_text(md, to_markdown(df, profile, run))
    return [Path(csv), Path(md)]


def parse_run(tables: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The run's tables, each ``name`` (its spec's seeds) or ``name:0,1,2`` -> its seeds."""
    run = {}
    for item in tables:
        name, _, seeds = item.partition(":")
        run[name] = parse_seeds(seeds or None, load_table(name).seeds)
    return run


def claims_ledger(
    claims: str | Path,
    profile: str,
    results: str,
    tables: Sequence[str],
    csv: str | Path,
    md: str | Path,
    reported: str | Path = REPORTED,
) -> list[Path]:
    """The stage: read ``claims`` against the run's ``tables`` (``name[:seeds]``) under the
    results root ``results``; write ``csv`` and ``md``."""
    loaded, specs = load_all(claims, reported)
    run = parse_run(tables)
    outcomes = evaluate(loaded, specs, {"results": results}, profile, run)
    return write_ledger(to_frame(outcomes, specs), csv, md, profile, run)
