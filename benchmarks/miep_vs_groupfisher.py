"""MIEP's pruning-stage time against GroupFisher's, on the same model and FLOPs target.

Trains a quick baseline of the default detector (``fasterrcnn_narrow_fpn``, 128 px, batch
8) on synthetic data, or takes ``--checkpoint``, then runs ``detprune.stages.prune`` (what
``detprune prune --method ...`` calls) with ``groupfisher`` and ``miep`` at ``--flops``,
one after the other in this process, with the default ``prune`` options; ``--repeats 2``
runs them in ABBA order so that a changing load on a shared machine hits both alike.
Usage: python benchmarks/miep_vs_groupfisher.py [--threads 2] [--flops 0.1] [--repeats 2]
       >> benchmarks/miep_vs_groupfisher.md   (the log goes to stderr)
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from detprune import stages
from detprune.config import deep_merge, load_config, validate
from detprune.data.synth import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("groupfisher", "miep")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flops", type=float, default=0.1)
    ap.add_argument("--images", type=int, default=96, help="synthetic training images")
    ap.add_argument("--train-iters", type=int, default=40, help="baseline training iterations")
    ap.add_argument("--checkpoint", default=None, help="baseline to prune (skips training)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per method, in ABBA order")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "config" / "config.yaml")
    cfg = deep_merge(
        copy.deepcopy(cfg),
        {
            "threads": args.threads,
            "data": {"synth": {"num_train": args.images, "num_val": 8}},
            "train": {"epochs": 1, "max_iters_per_epoch": args.train_iters, "warmup_iters": 10},
        },
    )
    validate(cfg, "benchmark")
    work = Path(tempfile.mkdtemp(prefix="miep_bench_"))
    synth = cfg["data"]["synth"]
    write_synthetic(work / "data", **synth)
    ann, images = str(work / "data/instances_train.json"), str(work / "data/train")
    base = args.checkpoint
    train_s = None
    if base is None:
        base = str(work / "baseline.pt")
        t0 = time.perf_counter()
        stages.train(cfg, ann, images, base)
        train_s = time.perf_counter() - t0
    load0 = os.getloadavg()
    rows = []
    order = [m for r in range(args.repeats) for m in (METHODS if r % 2 == 0 else METHODS[::-1])]
    for method in order:
        wall, cpu = time.perf_counter(), time.process_time()
        out = work / f"{method}-{len(rows)}"
        rec = stages.prune(cfg, method, args.flops, base, ann, images, f"{out}.pt", f"{out}.json")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append((method, rec, wall, cpu))
    load1 = os.getloadavg()

    model = cfg["model"]["name"]
    print(f"## {args.threads} thread(s), {args.repeats} run(s) per method\n")
    print(
        f"`python benchmarks/miep_vs_groupfisher.py --threads {args.threads} --flops "
        f"{args.flops} --repeats {args.repeats}`: `detprune.stages.prune` (the `detprune prune` "
        f"stage) on `{model}` "
        f"at {synth['image_size']} px, batch {cfg['train']['batch_size']}, to {args.flops:g} of "
        f"the FLOPs, default `prune` options, both methods one after the other in one process "
        f"on the same baseline ({'given checkpoint' if args.checkpoint else 'trained here'}"
        f"{f' for {args.train_iters} iterations in {train_s:.0f} s' if train_s else ''}).\n"
    )
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, `torch.set_num_threads({args.threads})`. **The machine was "
        f"shared** with other jobs (load average {load0[0]:.1f} before, {load1[0]:.1f} after, "
        f"on {os.cpu_count()} cores): wall times are inflated; CPU time is this process's.\n"
    )
    print(
        "| method | steps | iterations | FLOPs kept | params | wall s | CPU s | wall s / iter "
        "| training share of wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for method, rec, wall, cpu in rows:
        print(
            f"| {method} | {rec['steps']} | {rec['iterations']} | {rec['flops_kept']:.4f} | "
            f"{rec['params_before'] / 1e6:.2f}M -> {rec['params_after'] / 1e6:.2f}M | "
            f"{wall:.1f} | {cpu:.1f} | {wall / max(rec['iterations'], 1):.2f} | "
            f"{rec['seconds_training'] / rec['seconds']:.0%} |"
        )
    mean = {
        m: [sum(r[i] for r in rows if r[0] == m) / args.repeats for i in (2, 3)] for m in METHODS
    }
    (gw, gc), (mw, mc) = mean["groupfisher"], mean["miep"]
    print(
        f"\nMean over {args.repeats} run(s) per method: groupfisher {gw:.1f} s wall / {gc:.1f} s "
        f"CPU, miep {mw:.1f} s wall / {mc:.1f} s CPU; MIEP / GroupFisher: {mw / gw:.2f}x wall "
        f"time, {mc / gc:.2f}x CPU time."
    )


if __name__ == "__main__":
    main()
