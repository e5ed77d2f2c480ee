"""Paper-style result tables built from the metrics records ``detprune evaluate`` writes.

Tables report only the held-out test split. Where records carry a ``"bootstrap"`` entry
(:mod:`detprune.evaluation.bootstrap`: AP on the same seeded resamples of the test images),
each ΔmAP gets a paired percentile interval, seeds and images resampled together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detprune.evaluation.bootstrap import delta_interval, mark
from detprune.pruning.base import scratch_source
from detprune.utils.io import atomic_path, write_text

#: Top-level keys every metrics record must carry, and the keys required inside two of them.
RECORD_KEYS: tuple[str, ...] = (
    "detector",
    "method",
    "flops_target",
    "seed",
    "split",
    "metrics",
    "cost",
)
#: The only split a table reports.
TEST_SPLIT = "test"
#: Keys of a record's optional ``"bootstrap"`` entry that the intervals need.
BOOTSTRAP_KEYS: tuple[str, ...] = ("AP", "resamples", "seed", "image_ids_sha256")
COST_KEYS: tuple[str, ...] = ("params", "macs")
METRIC_KEYS: tuple[str, ...] = ("AP",)
#: ... or, for a classifier, these.
CLS_METRIC_KEYS: tuple[str, ...] = ("top1",)

BASELINE = "baseline"

#: Table column -> COCO metric it shows (in percent).
PERCENT_METRICS: dict[str, str] = {
    "mAP": "AP",
    "AP50": "AP50",
    "AP75": "AP75",
    "APs": "APs",
    "APm": "APm",
    "APl": "APl",
}
TEXT_COLUMNS: tuple[str, ...] = ("detector", "method", "vs ref", "mark")
COLUMNS: tuple[str, ...] = (
    "detector",
    "method",
    "flops_target (%)",
    "flops_kept (%)",
    "GMACs",
    "params (M)",
    "mAP",
    "mAP std",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "ΔmAP",
    "ΔmAP lo",
    "ΔmAP hi",
    "vs ref",
    "Δref",
    "Δref lo",
    "Δref hi",
    "mark",
    "seeds",
)
# Columns averaged over seeds (the rest are keys, derived, or counts).
_MEAN_COLUMNS: tuple[str, ...] = (
    "flops_target (%)",
    "GMACs",
    "params (M)",
    *PERCENT_METRICS,
    "_macs",
)
_DECIMALS: dict[str, int] = {
    "GMACs": 3,
    "params (M)": 2,
    "seeds": 0,
    **{c: 2 for c in ("speed-up", "ORT speed-up", "CUDA AMP speed-up", "latency IQR (ms)")},
    **{c: 2 for c in ("ORT (ms)", "ORT IQR (ms)", "CUDA AMP (ms)", "CUDA AMP IQR (ms)")},
    **{f"{d} {end}": 2 for d in ("ΔmAP", "Δref", "Δrepro") for end in ("lo", "hi")},
}
_MISSING_MD = "–"
#: A row's group: (detector, method, flops_target).
Key = tuple[str, str, float]
_KEYS = ("detector", "method", "flops_target")
_INTERVAL_COLUMNS = ("ΔmAP lo", "ΔmAP hi", "vs ref", "Δref", "Δref lo", "Δref hi", "mark")


def _check_record(record: Any, where: str) -> None:
    """Raise ValueError naming ``where`` when ``record`` lacks a required key, is not of the
    test split, or carries a malformed ``"bootstrap"`` entry."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a metrics record must be a JSON object")
    for key in RECORD_KEYS:
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
    if record["split"] != TEST_SPLIT:
        raise ValueError(
            f"{where}: split is {record['split']!r}; tables report only the held-out "
            f"{TEST_SPLIT!r} split (never val)"
        )
    if "bootstrap" in record:
        _check_bootstrap(record["bootstrap"], where)
    metric_keys = (
        CLS_METRIC_KEYS
        if isinstance(record["metrics"], dict) and "top1" in record["metrics"]
        else METRIC_KEYS
    )
    for parent, keys in (("cost", COST_KEYS), ("metrics", metric_keys)):
        if not isinstance(record[parent], dict):
            raise ValueError(f"{where}: {parent!r} must be a JSON object")
        for key in keys:
            if key not in record[parent]:
                raise ValueError(f"{where}: missing key '{parent}.{key}'")


def _check_bootstrap(boot: Any, where: str) -> None:
    if not isinstance(boot, dict):
        raise ValueError(f"{where}: 'bootstrap' must be a JSON object")
    for key in BOOTSTRAP_KEYS:
        if key not in boot:
            raise ValueError(f"{where}: missing key 'bootstrap.{key}'")
    if not isinstance(boot["AP"], list) or len(boot["AP"]) != boot["resamples"]:
        raise ValueError(f"{where}: 'bootstrap.AP' must list one AP per resample")


def load_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Read metrics records (JSON files); a missing key raises ValueError naming file and key."""
    records = []
    for path in paths:
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        _check_record(record, str(path))
        records.append(record)
    return records


def _percent(value: Any) -> float:
    return math.nan if value is None else float(value) * 100.0


def _record_row(record: dict[str, Any]) -> dict[str, Any]:
    metrics, cost = record["metrics"], record["cost"]
    row: dict[str, Any] = {
        "detector": str(record["detector"]),
        "method": str(record["method"]),
        "flops_target": float(record["flops_target"]),
        "seed": record["seed"],
        "flops_target (%)": float(record["flops_target"]) * 100.0,
        "GMACs": float(cost["macs"]) / 1e9,
        "params (M)": float(cost["params"]) / 1e6,
        "_macs": float(cost["macs"]),
    }
    for column, name in PERCENT_METRICS.items():
        row[column] = _percent(metrics.get(name))
    return row


def _record_name(record: dict[str, Any], i: int) -> str:
    return (
        f"record #{i} ({record.get('detector')}/{record.get('method')} "
        f"flops_target={record.get('flops_target')} seed={record.get('seed')})"
    )


def _key(record: dict[str, Any]) -> Key:
    return (str(record["detector"]), str(record["method"]), float(record["flops_target"]))


def _bootstrap_vectors(group: list[dict[str, Any]], name: str) -> tuple[list[np.ndarray], tuple]:
    """Per seed, the group's per-resample AP vectors and the resampling they share.

    Returns ``([], ())`` when a record of the group has no ``"bootstrap"`` entry.
    """
    if not group or any("bootstrap" not in r for r in group):
        return [], ()
    boots = [r["bootstrap"] for r in group]
    shared = {(b["image_ids_sha256"], int(b["resamples"]), b["seed"]) for b in boots}
    if len(shared) != 1:
        raise ValueError(f"{name}: its seeds' bootstraps use different images or resamples")
    return [np.asarray(b["AP"], dtype=float) for b in boots], shared.pop()


def _interval(
    groups: dict[Key, list[dict[str, Any]]], key: Key, other: Key, level: float, seed: int
) -> tuple[float, float]:
    """Percent-point interval of mean AP of ``key`` minus that of ``other`` (NaN if none)."""
    a, meta_a = _bootstrap_vectors(groups[key], f"method {key[1]!r}")
    b, meta_b = _bootstrap_vectors(groups[other], f"method {other[1]!r}")
    if not a or not b:
        return math.nan, math.nan
    if meta_a != meta_b:
        raise ValueError(
            f"methods {key[1]!r} and {other[1]!r} ({key[0]}, flops_target={key[2]:g}) were "
            "bootstrapped on different test images, resample counts or seeds: "
            f"{meta_a} vs {meta_b}"
        )
    lo, hi = delta_interval(a, b, level=level, seed=seed)
    return lo * 100.0, hi * 100.0


def _reference_of(method: str, reference: str) -> str:
    """``scratch-<m>``, a from-scratch control, is compared with ``<m>`` (not the
    reference)."""
    return scratch_source(method) or reference


def _add_intervals(
    table: pd.DataFrame,
    groups: dict[Key, list[dict[str, Any]]],
    reference: str,
    level: float,
    seed: int,
) -> None:
    """Fill the interval columns, ``vs ref``, ``Δref`` and ``mark`` of ``table`` in place."""
    keys = [(d, m, float(f)) for d, m, f in zip(*(table[c] for c in _KEYS), strict=True)]
    mean_ap = dict(zip(keys, table["mAP"], strict=True))
    base_key = {k[0]: k for k in keys if k[1] == BASELINE}
    cols: dict[str, list[Any]] = {c: [] for c in _INTERVAL_COLUMNS}
    for key in keys:
        detector, method, target = key
        base = base_key.get(detector)
        dmap = (math.nan, math.nan)
        if base is not None and method != BASELINE:
            dmap = _interval(groups, key, base, level, seed)
        ref = _reference_of(method, reference)
        ref_key = (detector, ref, target)
        dref, dref_ci, text = math.nan, (math.nan, math.nan), ""
        if method == BASELINE:
            ref = ""
        elif method == reference:
            ref, text = "", "reference"
        elif ref_key in groups:
            dref = mean_ap[key] - mean_ap[ref_key]
            dref_ci = _interval(groups, key, ref_key, level, seed)
            text = "" if math.isnan(dref_ci[0]) else mark(*dref_ci)
        values = (*dmap, ref, dref, *dref_ci, text)
        for column, value in zip(_INTERVAL_COLUMNS, values, strict=True):
            cols[column].append(value)
    for column, values in cols.items():
        table[column] = values


def build_table(
    records: list[dict[str, Any]], reference: str = "l1", level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """One row per (detector, method, flops_target), seeds averaged, baseline rows first.

    Metrics are in percent; ``flops_kept (%)`` and ``ΔmAP`` are relative to the detector's
    baseline record(s) (NaN when the detector has none); ``mAP std`` is the sample standard
    deviation over seeds (NaN for a single seed) and ``seeds`` the number of records averaged.

    ``Δref`` compares a row with its reference at the same flops_target, named in ``vs ref``:
    ``scratch-<m>`` with ``<m>``, every other method with ``reference``. Point deltas are
    differences of seed-mean AP; ``ΔmAP lo/hi`` and ``Δref lo/hi`` are ``level`` paired
    bootstrap intervals (:func:`detprune.evaluation.bootstrap.delta_interval`, rng ``seed``),
    NaN where a side has no ``"bootstrap"`` entry. ``mark`` reads the Δref interval:
    "better", "worse" or "within noise"; "reference" on the reference's rows; "" otherwise.
    """
    if not records:
        raise ValueError("no metrics records to tabulate")
    for i, record in enumerate(records):
        _check_record(record, _record_name(record, i))
    raw = pd.DataFrame([_record_row(r) for r in records])
    keys = list(_KEYS)
    duplicated = raw.duplicated([*keys, "seed"], keep=False)
    if duplicated.any():
        first = raw[duplicated].iloc[0]
        raise ValueError(
            f"several records for detector={first['detector']!r} method={first['method']!r} "
            f"flops_target={first['flops_target']} seed={first['seed']}"
        )
    groups: dict[Key, list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: repr(r["seed"])):  # seeds in a fixed order
        groups.setdefault(_key(record), []).append(record)

    grouped = raw.groupby(keys, sort=False, dropna=False)
    table = grouped[list(_MEAN_COLUMNS)].mean()
    table["mAP std"] = grouped["mAP"].std(ddof=1)
    table["seeds"] = grouped.size()
    table = table.reset_index()

    baselines = table[table["method"] == BASELINE]
    counts = baselines["detector"].value_counts()
    if (counts > 1).any():
        det = counts[counts > 1].index[0]
        raise ValueError(f"detector {det!r} has baseline records at several flops_targets")
    base = baselines.set_index("detector")
    base_macs = table["detector"].map(base["_macs"])
    base_map = table["detector"].map(base["mAP"])
    table["flops_kept (%)"] = table["_macs"] / base_macs * 100.0
    table["ΔmAP"] = table["mAP"] - base_map
    _add_intervals(table, groups, reference, level, seed)

    order = sorted(
        range(len(table)),
        key=lambda i: (
            table.at[i, "detector"],
            table.at[i, "method"] != BASELINE,
            table.at[i, "method"],
            -table.at[i, "flops_target"],
        ),
    )
    table = table.iloc[order].reset_index(drop=True)
    table["seeds"] = table["seeds"].astype("int64")
    table = table[list(COLUMNS)]
    table.attrs["level"] = level
    return table


def _format_number(value: Any, decimals: int, missing: str, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return missing
    text = f"{float(value):{'+' if signed else ''}.{decimals}f}"
    if float(text) == 0.0:  # no "-0.0" / "+0.0"
        text = f"{0.0:.{decimals}f}"
    return text


def _formatted(df: pd.DataFrame, missing: str, signed_delta: bool) -> list[list[str]]:
    """Rows of ``df`` as display strings (1 decimal unless ``_DECIMALS`` says otherwise)."""
    rows = []
    for values in df.itertuples(index=False, name=None):
        cells = []
        for column, value in zip(df.columns, values, strict=True):
            if column in TEXT_COLUMNS or isinstance(value, str):
                cells.append(str(value))
            else:
                signed = signed_delta and column.startswith("Δ")
                cells.append(_format_number(value, _DECIMALS.get(column, 1), missing, signed))
        rows.append(cells)
    return rows


def _is_numeric(df: pd.DataFrame, column: str) -> bool:
    return column not in TEXT_COLUMNS and pd.api.types.is_numeric_dtype(df[column])


def _spread(df: pd.DataFrame) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per shown column, the ``±`` half-width of each row and the columns it replaces.

    ``mAP``: the std over seeds (rows with several seeds); ``ΔmAP``, ``Δref`` and a paper
    table's ``Δrepro``: half the width of their interval, ``(hi - lo) / 2``. NaN where a
    row has none.
    """
    spread: dict[str, tuple[np.ndarray, list[str]]] = {}
    if {"mAP", "mAP std", "seeds"} <= set(df.columns):
        std = df["mAP std"].to_numpy(dtype=float)
        spread["mAP"] = (np.where(df["seeds"].to_numpy() > 1, std, np.nan), ["mAP std"])
    for delta in ("ΔmAP", "Δref", "Δrepro"):
        lo, hi = f"{delta} lo", f"{delta} hi"
        if {delta, lo, hi} <= set(df.columns):
            half = (df[hi].to_numpy(dtype=float) - df[lo].to_numpy(dtype=float)) / 2.0
            spread[delta] = (half, [lo, hi])
    return spread


def _display(df: pd.DataFrame) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, cells and right-alignment for Markdown and LaTeX: ``mean ± spread`` cells
    (see :func:`_spread`) replace the std and lo/hi columns; NaN is an en dash."""
    cells = _formatted(df, _MISSING_MD, signed_delta=True)
    columns = list(df.columns)
    spread = _spread(df)
    for column, (half, _) in spread.items():
        j = columns.index(column)
        decimals = _DECIMALS.get(column, 1)
        for row, h in zip(cells, half, strict=True):
            if not math.isnan(h) and row[j] != _MISSING_MD:
                row[j] = f"{row[j]} ± {_format_number(h, decimals, _MISSING_MD)}"
    dropped = {c for _, replaced in spread.values() for c in replaced}
    keep = [j for j, c in enumerate(columns) if c not in dropped]
    return (
        [columns[j] for j in keep],
        [[row[j] for j in keep] for row in cells],
        [_is_numeric(df, columns[j]) for j in keep],
    )


def to_markdown(df: pd.DataFrame) -> str:
    """GitHub Markdown pipe table (numbers right-aligned, ``mean ± spread``, NaN as –)."""

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    columns, cells, numeric = _display(df)
    header = [esc(str(c)) for c in columns]
    body = [[esc(c) for c in row] for row in cells]
    widths = [max([len(h), 3, *(len(row[j]) for row in body)]) for j, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric, strict=True)
    ]
    return "\n".join([line(header), line(rule), *(line(r) for r in body)]) + "\n"


_LATEX_SPECIAL: dict[str, str] = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (and write Δ as math) in plain ``text``."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(df: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); ``mean $\\pm$ spread``
    cells as in :func:`to_markdown`, NaN as an en dash."""
    columns, cells, numeric = _display(df)
    spec = "".join("r" if num else "l" for num in numeric)
    header = " & ".join(latex_escape(str(c)) for c in columns)
    body = [" & ".join(latex_escape(c) for c in row) + r" \\" for row in cells]
    lines = [
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        header + r" \\",
        r"\midrule",
        *body,
        r"\bottomrule",
        r"\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    formatted = pd.DataFrame(_formatted(df, "", signed_delta=False), columns=list(df.columns))
    with atomic_path(path) as tmp:
        formatted.to_csv(tmp, index=False, lineterminator="\n", encoding="utf-8")


def write_table(df: pd.DataFrame, stem: Path) -> list[Path]:
    """Write ``stem.csv``, ``stem.md`` and ``stem.tex`` atomically; return their paths."""
    stem = Path(stem)
    writers: list[tuple[str, Callable[[Path], None]]] = [
        (".csv", lambda p: _write_csv(df, p)),
        (".md", lambda p: write_text(p, to_markdown(df))),
        (".tex", lambda p: write_text(p, to_latex(df))),
    ]
    paths = []
    for suffix, write in writers:
        path = stem.with_name(stem.name + suffix)
        write(path)
        paths.append(path)
    return paths
