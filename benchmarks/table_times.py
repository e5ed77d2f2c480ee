"""Wall time of each paper table from one table run's Snakemake benchmark files.

Run after `snakemake --cores all --config table=all profile=mini` (jobs use all cores, so
they run one after the other): a table's time is the sum of the wall times of the jobs it
needs (its experiments' data, baselines, sparse training, prune / fine-tune / evaluate per
row and seed, and its report), which is what running that table alone would take. Jobs
shared by several tables count in each.

    python benchmarks/table_times.py --profile mini [--results results]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from detprune import experiments as E
from detprune import workflow as W


def _seconds(tsv: Path) -> float:
    with tsv.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return float(rows[-1]["s"])


def table_seconds(results: str, profile: str, name: str) -> tuple[float, int] | None:
    """Summed wall time (s) and number of jobs of table ``name``; None if not run yet."""
    spec = E.load_table(name)
    exps = E.plan({"results": results}, [spec], profile)
    files: list[Path] = []
    for exp in exps.values():
        bench = Path(W.path("benchmark", exp.config, stage="x")).parent
        data = "synth_cls" if exp.config["data"]["source"] == "synth_cls" else "synth"
        stages = [data, "check_train", "check_val", "train", "evaluate_baseline"]
        for method, flops in exp.targets:
            reg = W.sparsity_of(method)
            if reg:
                stages.append(f"sparse/{reg}")
            tag = f"{method}_flops{W.pct(flops)}"
            ft = f"{W.finetune_rule(exp.config, method)}/{tag}"
            if not (bench / f"{ft}.tsv").is_file():  # runs from before finetune_distill
                ft = f"finetune/{tag}"
            stages += [f"prune/{tag}", ft, f"evaluate/{tag}"]
        files += [bench / f"{s}.tsv" for s in dict.fromkeys(stages)]
    files.append(Path(results) / "benchmarks" / "tables" / profile / f"{name}.tsv")
    if not all(f.is_file() for f in files):
        return None
    return sum(_seconds(f) for f in files), len(files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="mini", choices=list(E.PROFILES))
    p.add_argument("--results", default="results")
    a = p.parse_args()
    print("| table | jobs | wall time (min) |\n|---|---:|---:|")
    for name in E.table_names():
        got = table_seconds(a.results, a.profile, name)
        print(f"| {name} | {got[1]} | {got[0] / 60:.1f} |" if got else f"| {name} | - | not run |")


if __name__ == "__main__":
    main()
