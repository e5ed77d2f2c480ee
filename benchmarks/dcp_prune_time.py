"""Wall and CPU time of the pruning stage of DCP and LCP (defaults) on a quickly trained baseline.

Trains the default detector (``fasterrcnn_narrow_fpn``, 128 px, batch 8) briefly on the
synthetic data, then runs the real pruning stage (:func:`detprune.stages.prune`) for each
method and FLOPs target, with ``l1`` as the reference. After pruning (no fine-tuning) it
also reports the detector's training loss on validation images and COCO AP, to show what
DCP/LCP's reconstruction buys over picking channels by magnitude at the same widths.
Usage: python benchmarks/dcp_prune_time.py [--threads 1] > benchmarks/dcp_prune_time.md
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch

from detprune import stages
from detprune.config import load_config
from detprune.data.coco import CocoDetection
from detprune.data.synth import write_synthetic
from detprune.train import checkpoint
from detprune.train.engine import evaluate, make_loader

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def val_loss(model: torch.nn.Module, data: CocoDetection, batches: int) -> float:
    """Mean detector training loss (BN in eval mode) over the first validation batches."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    torch.manual_seed(0)
    total, n = 0.0, 0
    for images, targets in make_loader(data, 8, shuffle=False, seed=0):
        if n >= batches:
            break
        total += float(sum(model(list(images), list(targets)).values()))
        n += 1
    model.eval()
    return total / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/detprune_dcp_bench")
    ap.add_argument("--num-train", type=int, default=300)
    ap.add_argument("--num-val", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["l1", "dcp", "lcp"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    config = load_config(ROOT / "config" / "config.yaml")
    config["train"].update(epochs=args.epochs, warmup_iters=20, device="cpu", amp=False)
    data = work / "synth"
    if not (data / "instances_val.json").exists():
        write_synthetic(data, seed=0, num_train=args.num_train, num_val=args.num_val)
    ann, images = str(data / "instances_train.json"), str(data / "train")
    base = work / "baseline.pt"
    t0 = time.perf_counter()
    if not base.exists():
        stages.train(config, ann, images, str(base))
    train_s = time.perf_counter() - t0
    val = CocoDetection(data / "instances_val.json", data / "val")
    model, _ = checkpoint.load_model(base)
    ap_base = evaluate(model, val, torch.device("cpu"), 8)[0]["AP"]
    print(f"# DCP / LCP pruning-stage time ({args.threads} thread(s))\n")
    print(
        f"Baseline: `fasterrcnn_narrow_fpn`, 128 px, trained {args.epochs} epochs on "
        f"{args.num_train} synthetic images ({train_s:.0f} s here; 0 = cached): "
        f"val loss {val_loss(model, val, 4):.3f}, AP {ap_base:.3f}. Pruning stage with "
        f"the config's defaults (batch 8); no fine-tuning before the loss/AP columns.\n"
    )
    print("| method | FLOPs target | kept | wall s | CPU s | val loss | AP |")
    print("|---|---|---|---|---|---|---|")
    for target in args.targets:
        for method in args.methods:
            cfg = copy.deepcopy(config)
            out = work / f"{method}_{target}.pt"
            t0, c0 = time.perf_counter(), time.process_time()
            rec = stages.prune(
                cfg, method, target, str(base), ann, images, str(out), str(out) + ".json"
            )
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            pruned, _ = checkpoint.load_model(out)
            ap_p = evaluate(pruned, val, torch.device("cpu"), 8)[0]["AP"]
            print(
                f"| {method} | {target:g} | {rec['flops_kept']:.4f} | {wall:.1f} | {cpu:.1f} "
                f"| {val_loss(pruned, val, 4):.3f} | {ap_p:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
