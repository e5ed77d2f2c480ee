"""The mini profile's baselines, per detector: val and test AP of each run's trained baseline.

Reads the baselines a table run trained (``<results>/experiments/mini/<dataset>/<model>/
seed<k>/models/baseline/seed<k>.pt``), scores each on its **val** split with the package
CLI (``detprune evaluate --split val``, written beside the test record as
``metrics/baseline_val/seed<k>.json``, skipped when present) and prints a Markdown table
with the test AP the run recorded. Choices (pretrained or scratch, schedules) are read
off the val column; the test column is what the tables report.

    python benchmarks/mini_baselines.py --run pretrained:results_pre --run scratch:results_scr
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path


def val_record(exp: Path, seed: str) -> dict:
    out = exp / f"metrics/baseline_val/seed{seed}.json"
    if not out.is_file():
        data = exp / "data/synth"
        cmd = [
            "detprune", "evaluate", "--config", str(exp / "config.yaml"),
            "--checkpoint", str(exp / f"models/baseline/seed{seed}.pt"),
            "--ann", str(data / "instances_val.json"), "--images", str(data / "val"),
            "--out", str(out), "--method", "baseline", "--flops", "1.0",
            "--split", "val", "--threads", "2",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(out.read_text())


def collect(label: str, root: Path) -> list[dict]:
    rows = []
    for ckpt in sorted(root.glob("experiments/mini/*/*/seed*/models/baseline/seed*.pt")):
        exp = ckpt.parents[2]
        seed = ckpt.stem.removeprefix("seed")
        test_file = exp / f"metrics/baseline/seed{seed}.json"
        if not test_file.is_file():
            continue
        test = json.loads(test_file.read_text())
        val = val_record(exp, seed)
        rows.append(
            {
                "run": label,
                "model": exp.parents[0].name,
                "seed": int(seed),
                "val_ap": 100 * (val["metrics"]["AP"] or 0),
                "test_ap": 100 * (test["metrics"]["AP"] or 0),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    runs = list(dict.fromkeys(r["run"] for r in rows))
    models = sorted({r["model"] for r in rows})
    head = "| detector | " + " | ".join(f"{r} val AP | {r} test AP" for r in runs) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(runs)]
    for m in models:
        cells = []
        for run in runs:
            sel = [r for r in rows if r["model"] == m and r["run"] == run]
            for key in ("val_ap", "test_ap"):
                vals = [r[key] for r in sel]
                if not vals:
                    cells.append("not run")
                elif len(vals) == 1:
                    cells.append(f"{vals[0]:.1f}")
                else:
                    sd = statistics.stdev(vals)
                    cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f} (n={len(vals)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="label:results root")
    p.add_argument("--json", default=None, help="write every row here")
    a = p.parse_args()
    rows = []
    for item in a.run:
        label, _, root = item.partition(":")
        rows += collect(label, Path(root))
    print(markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
