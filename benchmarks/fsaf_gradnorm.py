"""Gradient norm of each loss term of a detector on a few training batches (at init with
the pretrained backbone, or from a checkpoint): does one term dominate the clipped norm?"""

from __future__ import annotations

import argparse
import sys

import torch

from detprune.data.coco import CocoDetection
from detprune.models import build_model, model_kwargs
from detprune.train import checkpoint


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fsaf_narrow_fpn")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batches", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    ds = CocoDetection(f"{args.data}/instances_train.json", f"{args.data}/train")
    if args.ckpt:
        model, _ = checkpoint.load_model(args.ckpt)
    else:
        kw = {"pretrained_backbone": args.backbone} if args.backbone else {}
        model = build_model(args.model, ds.num_classes, model_kwargs(args.model, kw))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for b in range(args.batches):
        images, targets = zip(*[ds[8 * b + i] for i in range(8)], strict=True)
        losses = model(list(images), list(targets))
        row = {}
        for k, v in losses.items():
            g = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
            row[k] = (
                round(float(v), 3),
                round(float(torch.sqrt(sum((x**2).sum() for x in g if x is not None))), 2),
            )
        g = torch.autograd.grad(sum(losses.values()), params, allow_unused=True)
        row["total"] = round(float(torch.sqrt(sum((x**2).sum() for x in g if x is not None))), 2)
        print(f"batch {b}: (loss, grad norm)", row, flush=True)


if __name__ == "__main__":
    sys.exit(main())
