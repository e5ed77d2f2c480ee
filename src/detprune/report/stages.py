"""The report stages: the default run's tables and figures, and the paper tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detprune.utils.io import write_json
from detprune.utils.provenance import provenance


def report(
    config: dict[str, Any],
    metrics: list[str],
    summaries: list[str],
    tables_dir: str,
    figures_dir: str,
) -> list[Path]:
    """Paper-style tables, a compact metrics summary, and the figures."""
    from detprune.report.figures import plot_channels_per_layer, plot_map_vs_flops
    from detprune.report.tables import build_table, load_records, write_table

    name = config["report"]["name"]
    records = load_records([Path(p) for p in metrics])
    rcfg = config["report"]
    boot = config["evaluate"].get("bootstrap", {})
    df = build_table(
        records,
        reference=rcfg.get("reference", "l1"),
        level=rcfg.get("level", 0.95),
        seed=boot.get("seed", 0),
    )
    paths = write_table(df, Path(tables_dir) / name)
    write_json(Path(tables_dir) / f"{name}_summary.json", metrics_summary(df))
    paths.append(
        plot_map_vs_flops(
            df,
            Path(figures_dir) / f"{name}_map_vs_flops.png",
            title=f"{name}: mAP vs FLOPs kept (test split)",
        )
    )
    layer_records: dict[tuple[str, float], dict[str, Any]] = {}
    for p in summaries:  # one seed's widths per row: the first given
        rec = json.loads(Path(p).read_text())
        layer_records.setdefault(
            (rec["method"], rec["flops_target"]),
            {"method": rec["method"], "flops_target": rec["flops_target"], "layers": rec["layers"]},
        )
    paths.append(
        plot_channels_per_layer(
            list(layer_records.values()),
            Path(figures_dir) / f"{name}_channels_per_layer.png",
            title=f"{name}: channels kept per layer",
        )
    )
    return paths


#: Table columns the DVC metrics summary carries, per row.
SUMMARY_COLUMNS = (
    "mAP",
    "mAP std",
    "seeds",
    "AP50",
    "AP75",
    "ΔmAP",
    "ΔmAP lo",
    "ΔmAP hi",
    "Δref",
    "Δref lo",
    "Δref hi",
    "mark",
    "flops_kept (%)",
    "GMACs",
    "params (M)",
)


def metrics_summary(df: Any) -> dict[str, Any]:
    """The DVC metrics file: every row of the table (test split, mean over seeds),
    keyed ``<method>@<flops target>``; missing values left out."""
    rows: dict[str, Any] = {}
    for rec in df.to_dict("records"):
        key = f"{rec['method']}@{rec['flops_target (%)'] / 100:g}"
        if df["detector"].nunique() > 1:
            key = f"{rec['detector']}/{key}"
        rows[key] = {
            c: rec[c]
            for c in SUMMARY_COLUMNS
            if c in rec and isinstance(rec[c], (int, float, str)) and rec[c] == rec[c]
        }
    return {"split": "test", "rows": rows}


def paper_table(
    table: str,
    profile: str,
    results: str,
    seeds: str | None,
    reported: str,
    tables_dir: str,
    figures_dir: str,
) -> list[Path]:
    """A paper table (config/tables/<table>.yaml) from a table run's metrics records."""
    from detprune.experiments import load_table, parse_seeds
    from detprune.report.paper_tables import build_paper_table, plot_paper_table
    from detprune.report.reported import load_reported
    from detprune.report.tables import write_table

    spec = load_table(table)
    seed_list = parse_seeds(seeds, spec.seeds)
    df = build_paper_table(
        {"results": results}, spec, profile, seed_list, load_reported(Path(reported))
    )
    stem = Path(tables_dir) / table
    paths = write_table(df, stem)
    meta = provenance(
        None,
        table=table,
        title=spec.title,
        profile=profile,
        seeds=list(seed_list),
        reported=reported,
        caption=spec.caption,
    )
    write_json(stem.with_suffix(".json"), meta)
    figure = Path(figures_dir) / f"{table}_vs_flops.png"
    metric = spec.metric
    paths.append(plot_paper_table(df, figure, f"{table} ({profile}): {spec.title}", metric))
    return paths
