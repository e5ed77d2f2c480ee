"""Diagnose a short mini-profile training of FSAF (or RetinaNet): per-branch losses,
positives, level assignment, anchor-free box quality, and val AP with both branches, the
anchor-based branch only and the anchor-free branch only.

    python benchmarks/fsaf_diag.py --config results_d/.../fsaf_narrow_fpn/seed0/config.yaml \\
        --data results_d/.../fsaf_narrow_fpn/seed0/data/synth --epochs 3 --out /tmp/fsaf.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import torch

from detprune import stages
from detprune.config import load_config
from detprune.data.coco import CocoDetection
from detprune.models import fsaf as F
from detprune.train import checkpoint
from detprune.train.engine import evaluate


def masked_head(model, mode):
    """Wrap model.head.forward so that one branch's class logits are -inf."""
    orig = model.head.forward

    def fwd(features):
        out = orig(features)
        if mode == "ab":
            out["af_cls"] = [torch.full_like(c, -1e4) for c in out["af_cls"]]
        elif mode == "af":
            out["cls_logits"] = torch.full_like(out["cls_logits"], -1e4)
        return out

    model.head.forward = fwd
    return orig


def train_diag(model, ds, n=32):
    """Loss terms, positives and anchor-free IoU on ``n`` training images (no grad)."""
    model.train()
    images, targets = zip(*[ds[i] for i in range(n)], strict=True)
    with torch.no_grad():
        losses = model(list(images), list(targets))
        print("train-mode losses:", {k: round(float(v), 4) for k, v in losses.items()})
        if not hasattr(model.head, "af_cls"):
            return
        tg = [{**t, "labels": t["labels"] - 1} for t in targets]
        im_t, tg = model.transform(list(images), tg)
        feats = list(model.backbone(im_t.tensors).values())
        ho = model.head(feats)
        levels_all, ious, pos_counts, dist_stats = [], [], [], []
        for i, t in enumerate(tg):
            cls_n = [c[i] for c in ho["af_cls"]]
            reg_n = [r[i] for r in ho["af_reg"]]
            crit = F.instance_level_losses(cls_n, reg_n, t["boxes"], t["labels"], model.strides)
            lv = F.select_levels(crit)
            levels_all += lv.tolist()
            npos = 0
            for m, lvl in enumerate(lv.tolist()):
                s = model.strides[lvl]
                cls, reg = cls_n[lvl], reg_n[lvl]
                x0, y0, x1, y1 = F.shrunk_regions(t["boxes"][m : m + 1], s, 0.2, *cls.shape[-2:])[
                    0
                ].tolist()
                pred = F.decode_distances(reg[:, y0 : y1 + 1, x0 : x1 + 1], y0, x0, s, model.norm)
                ious += F.paired_iou(pred, t["boxes"][m].expand_as(pred)).tolist()
                npos += pred.shape[0]
                dist_stats.append(float(reg[:, y0 : y1 + 1, x0 : x1 + 1].mean()))
            pos_counts.append(npos)
        sizes = [
            float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sqrt().mean())
            for b in (t["boxes"] for t in tg)
        ]
        print("mean sqrt(area) of gt boxes (transformed px):", round(sum(sizes) / len(sizes), 1))
        print(
            "level histogram of selected levels:",
            torch.bincount(torch.tensor(levels_all), minlength=5).tolist(),
        )
        print(
            "effective pixels per image: mean",
            sum(pos_counts) / len(pos_counts),
            "instances/img",
            len(levels_all) / n,
        )
        print(
            f"AF IoU at positives: mean {sum(ious) / len(ious):.3f}"
            f" median {sorted(ious)[len(ious) // 2]:.3f}"
        )
        print(
            f"AF raw distance (ReLU out) mean at positives {sum(dist_stats) / len(dist_stats):.3f}"
        )
        for lvl, (c, r) in enumerate(zip(ho["af_cls"], ho["af_reg"], strict=True)):
            p = torch.sigmoid(c)
            print(
                f"  L{lvl} af score max {p.max():.3f} mean {p.mean():.4f}"
                f" frac>0.05 {(p > 0.05).float().mean():.4f}"
                f" reg>0 frac {(r > 0).float().mean():.3f} reg mean {r.mean():.3f}"
            )
        ab = torch.sigmoid(ho["cls_logits"])
        print(
            f"  AB score max {ab.max():.3f} mean {ab.mean():.4f}"
            f" frac>0.05 {(ab > 0.05).float().mean():.4f}"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train", default="{}")
    ap.add_argument("--kwargs", default="{}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = copy.deepcopy(load_config(args.config))
    cfg["train"].update({"epochs": args.epochs, "device": "cpu", **json.loads(args.train)})
    if args.model:
        cfg["model"]["name"] = args.model
    cfg["model"]["kwargs"] = {**cfg["model"].get("kwargs", {}), **json.loads(args.kwargs)}
    print("train:", cfg["train"], "model:", cfg["model"])
    if not args.skip_train:
        stages.train(
            cfg, str(args.data / "instances_train.json"), str(args.data / "train"), args.out
        )
    model, _ = checkpoint.load_model(args.out)
    tr = CocoDetection(str(args.data / "instances_train.json"), str(args.data / "train"))
    train_diag(model, tr)
    val = CocoDetection(str(args.data / "instances_val.json"), str(args.data / "val"))
    modes = ["both", "ab", "af"] if hasattr(model.head, "af_cls") else ["both"]
    for mode in modes:
        orig = masked_head(model, mode)
        model.eval()
        metrics, _ = evaluate(model, val, torch.device("cpu"))
        model.head.forward = orig
        print(
            f"VAL {mode}: AP {100 * metrics['AP']:.1f} AP50 {100 * metrics['AP50']:.1f}", flush=True
        )


if __name__ == "__main__":
    main()
