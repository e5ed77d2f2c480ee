"""Latency and speed-up columns of the default table, from the timing step's records.

Each timing record (``detprune time-latency``, :mod:`detprune.evaluation.latency`) holds
every checkpoint of one seed, the baseline among them, timed in one process. A row's
speed-up is computed inside each record (the baseline's median over the row's median,
so both come from the same job and the same minutes) and then averaged over the seeds,
like the latencies themselves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

#: The timings a record may hold -> the table's columns (median, IQR, speed-up).
TIMINGS: dict[str, tuple[str, str, str]] = {
    "torch": ("latency (ms)", "latency IQR (ms)", "speed-up"),
    "onnxruntime": ("ORT (ms)", "ORT IQR (ms)", "ORT speed-up"),
    "torch_cuda_amp": ("CUDA AMP (ms)", "CUDA AMP IQR (ms)", "CUDA AMP speed-up"),
}
#: Columns every table has (NaN without timing records); the CUDA ones only when timed.
LATENCY_COLUMNS: tuple[str, ...] = (*TIMINGS["torch"], *TIMINGS["onnxruntime"])
ROW_KEYS: tuple[str, ...] = ("detector", "method", "flops_target", "seed")
_KEYS = ["detector", "method", "flops_target"]


def _check(record: Any, where: str) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
        raise ValueError(f"{where}: a timing record must be a JSON object with a 'rows' list")
    for i, row in enumerate(record["rows"]):
        missing = [k for k in ROW_KEYS if k not in row]
        if "median_ms" not in row.get("torch", {}):
            missing.append("torch.median_ms")
        if missing:
            raise ValueError(f"{where}: rows[{i}] lacks {', '.join(map(repr, missing))}")
    if not any(r["method"] == "baseline" for r in record["rows"]):
        raise ValueError(f"{where}: no baseline row, so no speed-up can be computed")


def load_latency(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Read timing records; a malformed one raises ValueError naming the file."""
    out = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        _check(record, str(path))
        out.append(record)
    return out


def latency_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One line per (detector, method, flops_target): latencies and speed-ups, the mean
    over the records (seeds) that timed it."""
    lines = []
    for record in records:
        base = {r["detector"]: r for r in record["rows"] if r["method"] == "baseline"}
        for row in record["rows"]:
            line: dict[str, Any] = {k: row[k] for k in _KEYS}
            line["flops_target"] = float(line["flops_target"])
            ref = base.get(row["detector"])
            for kind, (median, iqr, speed) in TIMINGS.items():
                if kind not in row:
                    continue
                line[median] = row[kind]["median_ms"]
                line[iqr] = row[kind]["iqr_ms"]
                if ref is not None and kind in ref:
                    line[speed] = ref[kind]["median_ms"] / row[kind]["median_ms"]
            lines.append(line)
    if not lines:
        return pd.DataFrame(columns=[*_KEYS, *LATENCY_COLUMNS])
    return pd.DataFrame(lines).groupby(_KEYS, sort=False, dropna=False).mean().reset_index()


def add_latency(table: pd.DataFrame, records: list[dict[str, Any]]) -> pd.DataFrame:
    """``table`` (:func:`~detprune.report.tables.build_table`) with the latency and
    speed-up columns before ``seeds``; NaN for rows no record timed."""
    frame = latency_frame(records)
    columns = [c for c in frame.columns if c not in _KEYS]
    columns = [*LATENCY_COLUMNS, *(c for c in columns if c not in LATENCY_COLUMNS)]
    # targets as fractions rounded alike on both sides: 10.000000000000002 % is 0.1
    keyed = table.assign(flops_target=(table["flops_target (%)"] / 100.0).round(9))
    frame = frame.assign(flops_target=frame["flops_target"].round(9))
    merged = keyed.merge(frame, on=_KEYS, how="left", validate="one_to_one")
    out = table.copy()
    for column in columns:
        values = merged.get(column, math.nan)
        out.insert(list(out.columns).index("seeds"), column, values)
    out.attrs.update(table.attrs)
    return out
