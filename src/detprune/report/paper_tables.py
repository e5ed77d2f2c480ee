"""A paper table: the reported figure, the reproduced one (mean and std over seeds), the gap.

Rows come from a table spec (:mod:`detprune.experiments`), reproduced figures from the
metrics records ``detprune evaluate`` writes, reported ones from ``config/reported.yaml``.
A row whose method or detector is not in the registry is shown as missing, never filled.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detprune.evaluation.bootstrap import delta_interval
from detprune.experiments import TableSpec, baseline_metrics, row_metrics, table_files
from detprune.report.figures import grid, method_styles, save_figure
from detprune.report.tables import load_records

#: The table's metric -> the key of the metrics record (a fraction, shown in percent).
METRIC_FIELD = {"mAP": "AP", "AP50": "AP50", "top1": "top1"}
COLUMNS = (
    "detector",
    "method",
    "flops_target (%)",
    "flops_kept (%)",
    "params (M)",
    "paper base",
    "paper pruned",
    "Δpaper",
    "repro base",
    "repro pruned",
    "repro std",
    "Δrepro",
    "Δrepro lo",
    "Δrepro hi",
    "Δrepro − Δpaper",
    "seeds",
    "note",
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std


def build_paper_table(
    main: Mapping[str, Any],
    table: TableSpec,
    profile: str,
    seeds: Sequence[int],
    reported: Mapping[str, Any],
) -> pd.DataFrame:
    """One line per row of ``table``: reported and reproduced figures and their gaps."""
    records = {}
    for f in table_files(main, table, profile, seeds):
        records[f] = load_records([Path(f)])[0]
    lines = []
    for row in table.rows:
        field = METRIC_FIELD[table.metric_of(row.experiment)]
        rep = reported.get(row.reported) if row.reported else None
        if row.reported and rep is None:
            raise ValueError(f"table {table.name}: reported id {row.reported!r} is not in the data")
        base_vals, vals, deltas, kept, params, paired = [], [], [], [], [], []
        for seed in seeds if not row.missing else ():
            base = records[baseline_metrics(main, table, row.experiment, profile, seed)]
            rec = records[row_metrics(main, table, row, profile, seed)]
            b, v = _value(base, field), _value(rec, field)
            base_vals.append(b)
            vals.append(v)
            deltas.append(v - b)
            paired.append(_paired_difference(rec, base, field))
            kept.append(100.0 * rec["cost"]["macs"] / base["cost"]["macs"])
            params.append(rec["cost"]["params"] / 1e6)
        paper_base = _num(getattr(rep, "baseline", None))
        paper_pruned = _num(getattr(rep, "pruned", None))
        mean, std = _mean_std(vals)
        d_repro = _mean_std(deltas)[0]
        d_paper = paper_pruned - paper_base
        note = f"missing: {row.missing}" if row.missing else ("" if rep else "not reported")
        lines.append(
            {
                "detector": table.experiments[row.experiment]["label"],
                "method": row.label,
                "flops_target (%)": row.flops * 100,
                "flops_kept (%)": _mean_std(kept)[0],
                "params (M)": _mean_std(params)[0],
                "paper base": paper_base,
                "paper pruned": paper_pruned,
                "Δpaper": d_paper,
                "repro base": _mean_std(base_vals)[0],
                "repro pruned": mean,
                "repro std": std,
                "Δrepro": d_repro,
                **dict(zip(("Δrepro lo", "Δrepro hi"), _interval(paired), strict=True)),
                "Δrepro − Δpaper": d_repro - d_paper,
                "seeds": len(vals),
                "note": note,
            }
        )
    df = pd.DataFrame(lines, columns=list(COLUMNS))
    df["seeds"] = df["seeds"].astype("int64")
    return df


def _paired_difference(
    record: Mapping[str, Any], base: Mapping[str, Any], field: str
) -> np.ndarray | None:
    """Per bootstrap resample of the test images, the row's metric minus its baseline's
    (same experiment and seed, so the same images): None without resampled ``field``."""
    a, b = record.get("bootstrap", {}).get(field), base.get("bootstrap", {}).get(field)
    if a is None or b is None:
        return None
    return np.asarray(a, dtype=float) - np.asarray(b, dtype=float)


def _interval(paired: list[np.ndarray | None]) -> tuple[float, float]:
    """The 95 % interval of Δrepro (percent points): the per-seed paired differences,
    seeds and images resampled together; NaN when a seed has no bootstrap record."""
    if not paired or any(d is None for d in paired):
        return math.nan, math.nan
    lo, hi = delta_interval(paired, [np.zeros_like(paired[0])])
    return 100.0 * lo, 100.0 * hi


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _value(record: Mapping[str, Any], field: str) -> float:
    value = record["metrics"].get(field)
    if value is None:
        raise ValueError(f"{record.get('detector')}/{record.get('method')}: no metric {field!r}")
    return 100.0 * float(value)


def plot_paper_table(df: pd.DataFrame, path: Path, title: str, metric: str) -> Path:
    """Reproduced ``metric`` against FLOPs kept per method (filled, with std error bars)
    and the paper's figure at the FLOPs target (hollow), one subplot per detector."""
    shown = df[df["note"].str.startswith("missing") == False]  # noqa: E712
    detectors = list(dict.fromkeys(df["detector"])) or ["-"]
    styles = method_styles(list(df["method"].unique()))
    fig, axes = grid(len(detectors), 5.5, 4.0)
    for ax, det in zip(axes, detectors, strict=True):
        sub = shown[shown["detector"] == det]
        for method in dict.fromkeys(sub["method"]):
            rows = sub[sub["method"] == method].sort_values("flops_target (%)")
            color, marker = styles[method]
            x = rows["flops_kept (%)"].fillna(rows["flops_target (%)"])
            yerr = rows["repro std"].fillna(0.0).to_numpy(dtype=float)
            ax.errorbar(
                x,
                rows["repro pruned"],
                yerr=yerr,
                color=color,
                marker=marker,
                capsize=3,
                label=f"{method} (repro)",
            )
            paper = rows.dropna(subset=["paper pruned"])
            if not paper.empty:
                ax.plot(
                    paper["flops_target (%)"],
                    paper["paper pruned"],
                    linestyle=":",
                    marker=marker,
                    markerfacecolor="none",
                    color=color,
                    label=f"{method} (paper)",
                )
        base = sub["repro base"].dropna()
        if not base.empty:
            ax.axhline(
                float(base.mean()),
                color="black",
                linestyle="--",
                linewidth=1.0,
                label="baseline (repro)",
            )
        ax.set_title(str(det))
        ax.set_xlabel("FLOPs kept (%)")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
