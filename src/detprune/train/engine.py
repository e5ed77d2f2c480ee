"""Training engine in the shape of torchvision's references/detection.

``train_one_epoch`` and ``evaluate`` are the two pieces; ``fit`` strings epochs together
with a checkpoint written after every epoch and resume from it.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from detprune.data.coco import CocoDetection, collate
from detprune.evaluation.coco_eval import detections_to_coco, evaluate_detections
from detprune.train import checkpoint

log = logging.getLogger("detprune.train")
LossHook = Callable[[nn.Module, list, list, dict], dict]
GradHook = Callable[[nn.Module, float], None]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, epoch: int = 0
) -> DataLoader:
    """A loader whose order depends only on (seed, epoch): resumable and reproducible."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=0,
        collate_fn=collate,
    )


def build_optimizer(model: nn.Module, sched: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD with momentum; no weight decay on BatchNorm parameters and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": sched["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=sched["lr"], momentum=sched["momentum"])


def lr_factor(sched: Mapping[str, Any], iters_per_epoch: int) -> Callable[[int], float]:
    """Per-iteration lr multiplier: linear warm-up, then cosine, step or constant."""
    total = sched["epochs"] * iters_per_epoch
    warm = min(sched["warmup_iters"], max(total - 1, 0))
    milestones = [m * iters_per_epoch for m in sched.get("milestones", [])]
    gamma = sched.get("gamma", 0.1)

    def factor(it: int) -> float:
        base = 1.0
        if sched["schedule"] == "cosine":
            base = 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))
        elif sched["schedule"] == "step":
            base = gamma ** sum(it >= m for m in milestones)
        if it < warm:
            alpha = it / warm
            base *= 0.001 * (1 - alpha) + alpha
        return base

    return factor


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    *,
    scaler: torch.amp.GradScaler | None = None,
    max_iters: int | None = None,
    loss_hook: LossHook | None = None,
    grad_hook: GradHook | None = None,
    progress: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss term.

    ``loss_hook`` may add loss terms (distillation); ``grad_hook(model, progress)`` runs
    between backward and the optimizer step (sparsity regularizers), ``progress`` being
    the fraction of the whole schedule done, from ``progress=(epoch, epochs)``.
    """
    model.train()
    sums: dict[str, float] = {}
    n = 0
    total = min(len(loader), max_iters) if max_iters else len(loader)
    bar = tqdm(loader, total=total, desc=f"epoch {epoch}", leave=False, disable=None)
    for images, targets in bar:
        if max_iters and n >= max_iters:
            break
        images = [im.to(device) for im in images]
        targets = [
            {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
        ]
        with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
            losses = model(images, targets)
            if loss_hook is not None:
                losses = loss_hook(model, images, targets, losses)
            loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch}: loss is {loss.item()} ({losses})")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_hook is not None:
            grad_hook(model, (progress[0] + n / max(total, 1)) / progress[1])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        n += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        bar.set_postfix(
            loss=f"{float(loss.detach()):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}"
        )
    return {k: v / max(n, 1) for k, v in sums.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 8
) -> tuple[dict[str, float | None], str]:
    """COCO box metrics of ``model`` on ``dataset`` through pycocotools."""
    model.eval()
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0)
    results: list[dict] = []
    for images, targets in tqdm(loader, desc="evaluate", leave=False, disable=None):
        outputs = model([im.to(device) for im in images])
        outputs = [{k: v.cpu() for k, v in o.items()} for o in outputs]
        ids = [int(t["image_id"]) for t in targets]
        results.extend(detections_to_coco(outputs, ids, dataset.label_to_cat))
    return evaluate_detections(dataset.coco, results, image_ids=dataset.ids)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def fit(
    model: nn.Module,
    *,
    spec: dict[str, Any],
    history: list,
    sched: Mapping[str, Any],
    train_set: Dataset,
    seed: int,
    out: Path,
    meta: dict[str, Any],
    loss_hook: LossHook | None = None,
    grad_hook: GradHook | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``sched['epochs']`` epochs and write the final checkpoint ``out``.

    After every epoch a resume checkpoint ``<out>.resume.pt`` is written; a later call
    with the same ``meta['fingerprint']`` continues from it.
    """
    device = resolve_device(sched.get("device", "auto"))
    model.to(device)
    optimizer = build_optimizer(model, sched)
    iters = len(make_loader(train_set, sched["batch_size"], shuffle=True, seed=seed))
    if sched.get("max_iters_per_epoch"):
        iters = min(iters, sched["max_iters_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(sched, iters))
    use_amp = bool(sched.get("amp", False)) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    resume = Path(f"{out}.resume.pt")
    start, history_log = 0, []
    if resume.is_file():
        state = checkpoint.load(resume)
        if state["meta"].get("fingerprint") == meta.get("fingerprint"):
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
            start, history_log = int(state["epoch"]), list(state["log"])
            log.info("resumed from %s at epoch %d", resume, start)
        else:
            log.warning("ignoring %s: it belongs to another configuration", resume)
    for epoch in range(start, sched["epochs"]):
        loader = make_loader(train_set, sched["batch_size"], shuffle=True, seed=seed, epoch=epoch)
        losses = train_one_epoch(
            model,
            optimizer,
            scheduler,
            loader,
            device,
            epoch,
            scaler=scaler,
            max_iters=sched.get("max_iters_per_epoch"),
            loss_hook=loss_hook,
            grad_hook=grad_hook,
            progress=(epoch, sched["epochs"]),
        )
        history_log.append({"epoch": epoch, **losses, "lr": optimizer.param_groups[0]["lr"]})
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in losses.items()})
        checkpoint.save(
            resume,
            spec=spec,
            model=model,
            history=history,
            meta=meta,
            epoch=epoch + 1,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else {},
            rng=_rng_state(),
            log=history_log,
        )
    model.cpu()
    checkpoint.save(
        out,
        spec=spec,
        model=model,
        history=history,
        meta={**meta, "train_log": history_log},
        epoch=sched["epochs"],
    )
    resume.unlink(missing_ok=True)
    return {"log": history_log}
