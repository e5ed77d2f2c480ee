"""Figures: mAP against FLOPs kept, and the share of channels each method keeps per layer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from detprune.utils.io import atomic_path  # noqa: E402
from detprune.workflow import pct  # noqa: E402

BASELINE = "baseline"
DPI = 120
_PALETTE = plt.get_cmap("tab10").colors
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def save_figure(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as a PNG atomically, without the (version-dependent) Software tag."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def method_styles(methods: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """A fixed (colour, marker) per method name, independent of which subplot shows it."""
    return {
        m: (_PALETTE[i % len(_PALETTE)], _MARKERS[i % len(_MARKERS)])
        for i, m in enumerate(sorted(methods))
    }


def grid(n: int, width: float, height: float) -> tuple[Figure, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _error_bars(rows: pd.DataFrame) -> tuple[np.ndarray | None, bool]:
    """``[2, n]`` (below, above) error bars of ``rows``' mAP, and whether any is an interval.

    A row with a ΔmAP interval gets ``mAP - (ΔmAP - lo)`` to ``mAP + (hi - ΔmAP)``: the
    interval of its difference from the baseline, drawn around its own mAP. Other rows
    get ± ``mAP std``; a row with neither, no bar. None when no row has a bar.
    """
    n = len(rows)
    below = np.full(n, np.nan)
    above = np.full(n, np.nan)
    if "mAP std" in rows.columns:
        below = above = rows["mAP std"].to_numpy(dtype=float)
    interval = np.zeros(n, dtype=bool)
    if {"ΔmAP", "ΔmAP lo", "ΔmAP hi"} <= set(rows.columns):
        delta = rows["ΔmAP"].to_numpy(dtype=float)
        lo, hi = rows["ΔmAP lo"].to_numpy(dtype=float), rows["ΔmAP hi"].to_numpy(dtype=float)
        interval = ~np.isnan(lo) & ~np.isnan(hi)
        below = np.where(interval, delta - lo, below)
        above = np.where(interval, hi - delta, above)
    bars = np.vstack([below, above])
    if np.isnan(bars).all():
        return None, False
    return np.clip(np.nan_to_num(bars, nan=0.0), 0.0, None), bool(interval.any())


def plot_map_vs_flops(df: pd.DataFrame, path: Path, title: str = "") -> Path:
    """mAP against FLOPs kept (%), one line per method and one subplot per detector.

    ``df`` is a :func:`detprune.report.tables.build_table` frame. The baseline is a star
    plus a dashed horizontal line. Error bars show the ΔmAP interval (asymmetric, around the
    row's mAP) where the table has one, else ± ``mAP std`` (:func:`_error_bars`). Where a
    detector has no baseline (``flops_kept (%)`` is NaN) the FLOPs target is plotted instead.
    """
    for column in ("detector", "method", "flops_target (%)", "mAP"):
        if column not in df.columns:
            raise ValueError(f"table has no {column!r} column")
    if df.empty:
        raise ValueError("table has no rows to plot")
    detectors = sorted(df["detector"].unique())
    styles = method_styles([m for m in df["method"].unique() if m != BASELINE])
    level = df.attrs.get("level", 0.95)
    fig, axes = grid(len(detectors), 5.5, 4.0)
    for ax, detector in zip(axes, detectors, strict=True):
        sub = df[df["detector"] == detector]
        any_interval = False
        kept = sub["flops_kept (%)"] if "flops_kept (%)" in sub.columns else None
        if kept is None or kept.isna().any():
            x_col, x_label = "flops_target (%)", "FLOPs target (%)"
        else:
            x_col, x_label = "flops_kept (%)", "FLOPs kept (%)"
        for method in sorted(m for m in sub["method"].unique() if m != BASELINE):
            rows = sub[sub["method"] == method].sort_values(x_col)
            color, marker = styles[method]
            yerr, with_interval = _error_bars(rows)
            any_interval |= with_interval
            ax.errorbar(
                rows[x_col].to_numpy(dtype=float),
                rows["mAP"].to_numpy(dtype=float),
                yerr=yerr,
                color=color,
                marker=marker,
                linestyle="-",
                capsize=3,
                label=method,
            )
        base = sub[sub["method"] == BASELINE]
        if not base.empty:
            bx = float(base[x_col].iloc[0])
            by = float(base["mAP"].iloc[0])
            ax.axhline(by, color="black", linestyle="--", linewidth=1.0)
            ax.plot(
                [bx],
                [by],
                marker="*",
                markersize=14,
                color="black",
                linestyle="none",
                label=BASELINE,
            )
        ax.set_title(str(detector))
        ax.set_xlabel(x_label)
        ax.set_ylabel("mAP (%)")
        ax.grid(True, alpha=0.3)
        legend_title = f"bars: {level:.0%} CI of ΔmAP" if any_interval else None
        ax.legend(fontsize="small", title=legend_title, title_fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _short_names(names: Sequence[str], max_len: int = 20) -> list[str]:
    """Short tick labels: the trailing dotted components of each name that fit ``max_len``.

    Labels that would collide are lengthened one component at a time until they differ.
    """
    parts = [n.split(".") for n in names]
    keep = []
    for p in parts:
        k = 1
        while k < len(p) and len(".".join(p[-(k + 1) :])) <= max_len:
            k += 1
        keep.append(k)
    while True:
        labels = [".".join(p[-k:]) for p, k in zip(parts, keep, strict=True)]
        seen: dict[str, int] = {}
        for label in labels:
            seen[label] = seen.get(label, 0) + 1
        grow = [i for i, label in enumerate(labels) if seen[label] > 1 and keep[i] < len(parts[i])]
        if not grow:
            return labels
        for i in grow:
            keep[i] += 1


def _kept_share(layer: str, value: Any, where: str) -> float:
    try:
        kept, original = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: layer {layer!r} must map to [kept, original]") from exc
    if original <= 0 or kept < 0 or kept > original:
        raise ValueError(f"{where}: layer {layer!r} has kept={kept:g} of original={original:g}")
    return kept / original


def plot_channels_per_layer(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Kept share of channels per layer: one subplot per flops_target, one line per method.

    Each record is ``{"method", "flops_target", "layers": {name: [kept, original]}}``;
    layers keep the order in which they first appear.
    """
    if not records:
        raise ValueError("no channel records to plot")
    layer_names: dict[str, None] = {}
    series: dict[float, dict[str, dict[str, float]]] = {}
    for i, record in enumerate(records):
        for key in ("method", "flops_target", "layers"):
            if key not in record:
                raise ValueError(f"channel record #{i}: missing key {key!r}")
        layers: Mapping[str, Any] = record["layers"]
        where = f"channel record #{i} ({record['method']}, {record['flops_target']})"
        target = float(record["flops_target"])
        shares = {name: _kept_share(name, v, where) for name, v in layers.items()}
        by_method = series.setdefault(target, {})
        if str(record["method"]) in by_method:
            raise ValueError(f"{where}: duplicate (method, flops_target)")
        by_method[str(record["method"])] = shares
        layer_names.update(dict.fromkeys(layers))
    names = list(layer_names)
    if not names:
        raise ValueError("channel records list no layers")
    labels = _short_names(names)
    styles = method_styles(list({m for by in series.values() for m in by}))
    targets = sorted(series, reverse=True)
    width = max(6.0, 0.22 * len(names) + 1.5)
    fig, axes = plt.subplots(
        len(targets), 1, figsize=(width, 2.6 * len(targets) + 1.2), sharex=True, squeeze=False
    )
    x = np.arange(len(names))
    for ax, target in zip(axes[:, 0], targets, strict=True):
        for method in sorted(series[target]):
            shares = series[target][method]
            y = np.array([shares.get(n, np.nan) for n in names], dtype=float)
            color, marker = styles[method]
            ax.plot(x, y, color=color, marker=marker, markersize=3, linewidth=1.0, label=method)
        ax.set_title(f"FLOPs target {pct(target)}%", fontsize="medium")
        ax.set_ylabel("kept share")
        ax.set_ylim(0.0, 1.05)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    bottom = axes[-1, 0]
    bottom.set_xticks(x)
    bottom.set_xticklabels(labels, rotation=90, fontsize=6)
    bottom.set_xlabel("layer")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
