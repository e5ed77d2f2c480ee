"""Contrasts of one method's options, scored on the val split (where choices are made).

Each variant is a label and config overrides (dotted keys); per variant this runs the
package CLI's stages on a trained baseline: (sparse training, for a method that needs it)
-> prune to ``--flops`` -> fine-tune -> evaluate on **val** (never test), and prints the
val AP of each variant with its prune summary's kept FLOPs.

    python benchmarks/val_contrast.py --results /tmp/dr19/results --method dcp --flops 0.1 \\
        --work /tmp/contrast --variant normalised: \\
        --variant raw:prune.options={dcp: {recon_normalize: false}}

``--results`` holds a default run's data and baseline (``models/baseline/seed0.pt``). Two
chains run side by side, one thread each. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from detprune.pruning.methods import sparsity_of

ROOT = Path(__file__).resolve().parents[1]


def configure(work: Path, overrides: list[str]) -> Path:
    """``config/config.yaml`` with ``overrides`` (``dotted.key=yaml value``) in ``work``."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for item in overrides:
        key, _, text = item.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(text)
    cfg["results"] = str(work)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)


def chain(
    results: Path, work: Path, overrides: list[str], method: str, flops: float, before: bool = False
) -> dict:
    """Sparse (if ``method`` needs it) -> prune -> fine-tune -> evaluate on val, in ``work``;
    with ``before``, the pruned model is scored on val too, before fine-tuning."""
    work.mkdir(parents=True, exist_ok=True)
    common = ["--config", str(configure(work, overrides)), "--threads", "1"]
    data, log = results / "data/synth", work / "log.txt"
    train = ["--train-ann", str(data / "instances_train.json")]
    train += ["--train-images", str(data / "train")]
    base = source = results / "models/baseline/seed0.pt"
    reg = sparsity_of(method)
    if reg is not None:
        source = work / "sparse.pt"
        _run(["detprune", "sparse", *common, "--regularizer", reg, "--checkpoint", str(base),
              *train, "--out", str(source)], log)  # fmt: skip
    _run(["detprune", "prune", *common, "--method", method, "--flops", str(flops),
          "--checkpoint", str(source), *train, "--out", str(work / "pruned.pt"),
          "--summary", str(work / "pruned.json")], log)  # fmt: skip
    val = ["--ann", str(data / "instances_val.json"), "--images", str(data / "val")]
    val += ["--split", "val", "--method", method, "--flops", str(flops)]
    row: dict[str, Any] = {}
    if before:
        _run(["detprune", "evaluate", *common, *val, "--checkpoint", str(work / "pruned.pt"),
              "--out", str(work / "val_before.json")], log)  # fmt: skip
        row["before_AP"] = json.loads((work / "val_before.json").read_text())["metrics"]["AP"]
    _run(["detprune", "finetune", *common, "--method", method, "--checkpoint",
          str(work / "pruned.pt"), "--teacher", str(base), *train,
          "--out", str(work / "finetuned.pt")], log)  # fmt: skip
    _run(["detprune", "evaluate", *common, *val, "--checkpoint", str(work / "finetuned.pt"),
          "--out", str(work / "val.json")], log)  # fmt: skip
    record: dict[str, Any] = json.loads((work / "val.json").read_text())
    summary = json.loads((work / "pruned.json").read_text())
    return {**row, "val_AP": record["metrics"]["AP"], "kept": summary["flops_kept"], "work": work}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``label:key=value;key=value`` -> (label, overrides); ``label:`` has none."""
    label, _, rest = text.partition(":")
    return label, [item for item in rest.split(";") if item]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--flops", type=float, default=0.1)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--variant", action="append", required=True, help="label:key=value;...")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--before", action="store_true", help="score the pruned model on val too")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]

    def one(v: tuple[str, list[str]]) -> dict:
        label, overrides = v
        work = args.work / f"{args.method}_{args.flops:g}_{label}"
        return {"label": label, "overrides": overrides, **chain(
            args.results, work, overrides, args.method, args.flops, args.before)}  # fmt: skip

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, variants))
    print(f"{args.method} at {args.flops:.0%} FLOPs, val split (150 images), seed 0")
    extra = " val AP before fine-tuning |" if args.before else ""
    print(f"| variant | overrides | FLOPs kept |{extra} val AP |")
    print("|---|---|---:|" + ("---:|" if args.before else "") + "---:|")
    for r in rows:
        shown = "; ".join(r["overrides"]) or "defaults"
        pre = f" {100 * r['before_AP']:.1f} |" if args.before else ""
        print(f"| {r['label']} | `{shown}` | {r['kept']:.3f} |{pre} {100 * r['val_AP']:.1f} |")


if __name__ == "__main__":
    main()
