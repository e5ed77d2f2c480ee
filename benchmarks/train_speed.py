"""Training and inference throughput of the registry's Faster R-CNN configurations on CPU.

Compares torchvision's R-CNN proposal/RoI budget (2000 proposals, 512 RoIs per image)
with the CPU budget of the registry entries, on synthetic 128 px batches of 8.
Usage: python benchmarks/train_speed.py [--threads 2] [--iters 5] > benchmarks/train_speed.md
"""

from __future__ import annotations

import argparse
import time

import torch

from detprune.evaluation.cost import count_macs, count_params
from detprune.models import MODELS, build_model

TORCHVISION_BUDGET = {
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_batch_size_per_image": 256,
    "box_batch_size_per_image": 512,
}


def batch(n: int, size: int) -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=gen) for _ in range(n)]
    boxes = torch.tensor([[10.0, 10, 50, 50], [60, 60, 120, 110], [5, 70, 20, 85]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 3])} for _ in range(n)]
    return images, targets


def measure(name: str, overrides: dict, iters: int) -> tuple[float, float, int, int]:
    torch.manual_seed(0)
    model = build_model(name, 5, overrides)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = batch(8, 128)
    model.train()
    for i in range(iters + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_ips = 8 * iters / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        model(images)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(images)
    eval_ips = 8 * iters / (time.perf_counter() - t0)
    entry = MODELS[name]
    macs = count_macs(
        model,
        128,
        per_roi_modules=entry.per_roi_modules,
        rois_per_image=overrides.get("rpn_post_nms_top_n_test", 100),
    )["macs"]
    return train_ips, eval_ips, count_params(model), macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch 8 at 128 px\n")
    print("| model | proposal budget | train img/s | eval img/s | params (M) | GMACs |")
    print("|---|---|---|---|---|---|")
    for name in ("fasterrcnn_narrow_fpn", "fasterrcnn_r18_fpn"):
        for label, extra in (("CPU (registry)", {}), ("torchvision", TORCHVISION_BUDGET)):
            kw = {**MODELS[name].defaults, **extra}
            tr, ev, params, macs = measure(name, kw, args.iters)
            print(
                f"| {name} | {label} | {tr:.1f} | {ev:.1f} | {params / 1e6:.2f} | "
                f"{macs / 1e9:.3f} |"
            )


if __name__ == "__main__":
    main()
