"""Track the effective rank of a YOLO's features over its first training iterations.

Builds a registry detector at its defaults, trains it with the engine's SGD (the default
run's lr 0.04, momentum 0.9 and weight decay 1e-4; 50 warm-up iterations, cosine over 10
epochs) on a synthetic dataset and, at fixed iterations, prints for a few modules the
effective rank of their output over 32 validation images in train mode (the
participation ratio (sum s)^2 / sum s^2 of the singular values of the centred pixels x
channels matrix: about the number of channels for spread-out features, 1 for collapsed
ones) and the weight norm of the first module. ``--only cls|obj|box`` trains on one loss
term. At iteration 0 it first prints |grad| / |weight| of every fourth conv for the class
loss on 16 training images.

    python benchmarks/yolo_rank_collapse.py yolov4_narrow --data results/data/synth
    python benchmarks/yolo_rank_collapse.py yolov4_tiny_narrow --modules backbone.stem0 \\
        backbone.blocks.1 backbone.final neck
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from detprune.data.coco import CocoDetection
from detprune.data.transforms import get_transform
from detprune.models import MODELS, build_model
from detprune.train.engine import build_optimizer, epoch_iters, lr_factor, make_loader

PROBE_AT = (0, 5, 10, 20, 50, 100, 150, 200)


def effective_rank(a: Tensor) -> float:
    """Participation ratio of the singular values of the centred (pixels, channels) matrix."""
    f = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
    s = torch.linalg.svdvals(f - f.mean(0))
    return float(s.sum() ** 2 / (s**2).sum())


def ranks(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, float]:
    """Effective rank of each named module's output (its last tensor if it returns a list)."""
    acts: dict[str, Tensor] = {}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_hook(
            lambda _m, _i, o, n=n: acts.__setitem__(n, o if torch.is_tensor(o) else o[-1])
        )
        for n in names
    ]
    with torch.no_grad():
        model.train()
        model.head(model.neck(model.backbone(x)))
    for h in hooks:
        h.remove()
    return {n: effective_rank(a) for n, a in acts.items()}


def grad_ratios(model: nn.Module, images: list, targets: list) -> list[tuple[str, float]]:
    """|grad| / |weight| of every conv for the class loss on one batch."""
    model.zero_grad()
    model(images, targets)["loss_cls"].backward()
    rows = [
        (n, float(m.weight.grad.norm() / m.weight.detach().norm()))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.weight.grad is not None
    ]
    model.zero_grad()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--data", type=Path, default=Path("results/data/synth"))
    ap.add_argument("--lr", type=float, default=0.04)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--only", choices=("cls", "obj", "box"))
    ap.add_argument(
        "--modules",
        nargs="+",
        default=["backbone.stem", "backbone.stages.2", "backbone.stages.4", "neck"],
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(args.model, 6, dict(MODELS[args.model].defaults))
    train = CocoDetection(
        str(args.data / "instances_train.json"),
        str(args.data / "train"),
        transforms=get_transform("hflip", train=True),
    )
    val = CocoDetection(str(args.data / "instances_val.json"), str(args.data / "val"))
    x, _, _ = model.transform([val[i][0] for i in range(32)])
    images, targets = zip(*[train[i] for i in range(16)], strict=True)
    for name, r in grad_ratios(model, list(images), list(targets))[::4]:
        print(f"grad/weight {name}: {r:.2f}")
    sched = {"lr": args.lr, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 10}
    sched |= {"warmup_iters": 50, "schedule": "cosine"}
    opt = build_optimizer(model, sched)
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(sched, epoch_iters(len(train), 8)))
    stem = dict(model.named_modules())[args.modules[0]]
    it, epoch = 0, 0
    while True:
        for ims, tgs in make_loader(train, 8, shuffle=True, seed=0, epoch=epoch):
            if it in PROBE_AT or it == args.iters:
                r = ranks(model, x, args.modules)
                w = float(next(stem.parameters()).detach().norm())
                print(it, " ".join(f"{n}:{v:.1f}" for n, v in r.items()), f"|w0| {w:.2f}")
            if it == args.iters:
                return
            losses = model(ims, tgs)
            loss = losses[f"loss_{args.only}"] if args.only else sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            lrs.step()
            it += 1
        epoch += 1


if __name__ == "__main__":
    main()
