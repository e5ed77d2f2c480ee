"""Paper-style result tables built from the metrics records ``detprune evaluate`` writes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from detprune.utils.io import atomic_path, write_text

#: Top-level keys every metrics record must carry, and the keys required inside two of them.
RECORD_KEYS: tuple[str, ...] = ("detector", "method", "flops_target", "seed", "metrics", "cost")
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
TEXT_COLUMNS: tuple[str, ...] = ("detector", "method")
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
    "latency (ms)",
    "seeds",
)
# Columns averaged over seeds (the rest are keys, derived, or counts).
_MEAN_COLUMNS: tuple[str, ...] = (
    "flops_target (%)",
    "GMACs",
    "params (M)",
    *PERCENT_METRICS,
    "latency (ms)",
    "_macs",
)
_DECIMALS: dict[str, int] = {"GMACs": 3, "params (M)": 2, "seeds": 0}
_MISSING_MD = "–"


def _check_record(record: Any, where: str) -> None:
    """Raise ValueError naming ``where`` and the key when ``record`` lacks a required key."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a metrics record must be a JSON object")
    for key in RECORD_KEYS:
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
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
        "latency (ms)": math.nan if cost.get("latency_ms") is None else float(cost["latency_ms"]),
        "_macs": float(cost["macs"]),
    }
    for column, name in PERCENT_METRICS.items():
        row[column] = _percent(metrics.get(name))
    return row


def build_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (detector, method, flops_target), seeds averaged, baseline rows first.

    Metrics are in percent; ``flops_kept (%)`` and ``ΔmAP`` are relative to the detector's
    baseline record (NaN when the detector has none); ``mAP std`` is the sample standard
    deviation over seeds (NaN for a single seed) and ``seeds`` the number of records averaged.
    """
    if not records:
        raise ValueError("no metrics records to tabulate")
    for i, record in enumerate(records):
        _check_record(record, f"record #{i}")
    raw = pd.DataFrame([_record_row(r) for r in records])
    keys = ["detector", "method", "flops_target"]
    duplicated = raw.duplicated([*keys, "seed"], keep=False)
    if duplicated.any():
        first = raw[duplicated].iloc[0]
        raise ValueError(
            f"several records for detector={first['detector']!r} method={first['method']!r} "
            f"flops_target={first['flops_target']} seed={first['seed']}"
        )

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
    return table[list(COLUMNS)]


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


def to_markdown(df: pd.DataFrame) -> str:
    """GitHub Markdown pipe table (numbers right-aligned, NaN as an en dash)."""

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    header = [esc(str(c)) for c in df.columns]
    body = [[esc(c) for c in row] for row in _formatted(df, _MISSING_MD, signed_delta=True)]
    widths = [max([len(h), 3, *(len(row[j]) for row in body)]) for j, h in enumerate(header)]
    numeric = [_is_numeric(df, c) for c in df.columns]

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
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (and write Δ as math) in plain ``text``."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(df: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); NaN as an en dash."""
    spec = "".join("r" if _is_numeric(df, c) else "l" for c in df.columns)
    header = " & ".join(latex_escape(str(c)) for c in df.columns)
    body = [
        " & ".join(latex_escape(c) for c in row) + r" \\"
        for row in _formatted(df, _MISSING_MD, signed_delta=True)
    ]
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
