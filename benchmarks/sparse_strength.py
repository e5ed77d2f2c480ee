"""Sparse-training strength, chosen on the val split: |gamma| sparsity and val AP after pruning.

For each strength ``s`` of one regularizer (``sparse.regularizers.<reg>.s``, other keys as in
the config, ``--set`` overrides) this runs :func:`val_contrast.chain` on a trained baseline:
sparse training -> prune with ``--method`` to ``--flops`` -> fine-tune -> evaluate on **val**
(never test), and reports the share of BN |gamma| below 1e-2 after sparse training with the
val AP.

    python benchmarks/sparse_strength.py --results /tmp/dr19/results --method slim \\
        --regularizer bn_l1 --values 1e-4 1e-3 1e-2 --flops 0.1 --work /tmp/sweep

``--results`` holds a default run's data and baseline (``models/baseline/seed0.pt``). Two
chains run side by side, one thread each. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from val_contrast import chain  # noqa: E402


def gamma_stats(ckpt: Path) -> dict[str, float]:
    """Share of BN |gamma| below 1e-2 and 1e-3, and the median, of a checkpoint's model."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    gammas = [
        v.abs().flatten()
        for k, v in state.items()
        if k.endswith(".weight") and v.ndim == 1 and k.replace("weight", "running_var") in state
    ]
    g = torch.cat(gammas)
    return {
        "below_1e-2": float((g < 1e-2).float().mean()),
        "below_1e-3": float((g < 1e-3).float().mean()),
        "median": float(g.median()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--regularizer", required=True)
    p.add_argument("--values", type=float, nargs="+", required=True)
    p.add_argument("--flops", type=float, default=0.1)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the work folders")
    p.add_argument("--set", nargs="*", default=[], help="config overrides: dotted.key=value")
    args = p.parse_args()

    def one(value: float) -> dict:
        key = f"sparse.regularizers.{args.regularizer}.s={value}"
        work = args.work / f"s{value:g}{args.tag}"
        row = chain(args.results, work, [key, *args.set], args.method, args.flops)
        return {"s": value, **gamma_stats(work / "sparse.pt"), **row}

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, args.values))
    print(f"{args.method} at {args.flops:.0%} FLOPs, regularizer {args.regularizer}, val split")
    print(f"overrides: {args.set or 'none'}")
    print("| s | |gamma| < 1e-2 | < 1e-3 | median |gamma| | val AP |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['s']:g} | {r['below_1e-2']:.3f} | {r['below_1e-3']:.3f} | "
            f"{r['median']:.3f} | {100 * r['val_AP']:.1f} |"
        )


if __name__ == "__main__":
    main()
