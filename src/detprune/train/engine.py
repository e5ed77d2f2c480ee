"""Training engine in the shape of torchvision's references/detection.

``train_one_epoch`` and ``evaluate`` are the two pieces; ``fit`` strings epochs together
with a resume point written after every epoch and, on SIGTERM/SIGUSR1, after the current
iteration; a later call continues from it bitwise-identically (on the CPU). Under torchrun
``fit`` trains with DistributedDataParallel (see :mod:`detprune.train.distributed`).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from detprune.data.coco import CocoDetection, collate
from detprune.evaluation.coco_eval import detections_to_coco, evaluate_detections
from detprune.train import checkpoint
from detprune.train import distributed as D
from detprune.train.distill_base import hook_optimizers

log = logging.getLogger("detprune.train")
LossHook = Callable[[nn.Module, list, list, dict], dict]
GradHook = Callable[[nn.Module, float], None]
MetaHook = Callable[[nn.Module], Mapping[str, Any]]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world: int = 1,
    skip: int = 0,
    limit: int | None = None,
) -> DataLoader:
    """A loader whose order depends only on (seed, epoch): resumable and reproducible.

    With ``world`` > 1 it yields rank ``rank``'s shard (see :func:`distributed.shard`);
    ``skip`` batches are left out at the start (mid-epoch resume) and at most ``limit``
    batches counted from the epoch's start are yielded.
    """
    sampler = D.EpochSampler(
        len(dataset),
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        rank=rank,
        world=world,
        start=skip * batch_size,
        stop=limit * batch_size if limit else None,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
        num_workers=0,
        collate_fn=collate,
    )


def epoch_iters(n: int, batch_size: int, world: int = 1, max_iters: int | None = None) -> int:
    """Optimizer steps per epoch of one process: its shard in batches, capped by max_iters."""
    iters = math.ceil(math.ceil(n / world) / batch_size)
    return min(iters, max_iters) if max_iters else iters


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
    clip: float | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss term.

    ``loss_hook`` may add loss terms (distillation); ``grad_hook(model, progress)`` runs
    between backward and the optimizer step (sparsity regularizers), ``progress`` being
    the fraction of the whole schedule done, from ``progress=(epoch, epochs)``.
    """
    total = min(len(loader), max_iters) if max_iters else len(loader)
    run = _EpochRun(total=total)
    _run_epoch(
        model,
        model,
        optimizer,
        scheduler,
        loader,
        device,
        epoch,
        run,
        scaler=scaler,
        loss_hook=loss_hook,
        grad_hook=grad_hook,
        progress=progress,
        clip=clip,
    )
    return run.means()


@dataclass
class _EpochRun:
    """Where an epoch stands: iterations done of ``total`` and the running loss sums."""

    total: int
    done: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        return {k: v / max(self.done, 1) for k, v in self.sums.items()}


def _to(device: torch.device, images: Any, targets: Any) -> tuple[list, list]:
    images = [im.to(device) for im in images]
    targets = [
        {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
    ]
    return images, targets


def _run_epoch(
    net: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    run: _EpochRun,
    *,
    scaler: torch.amp.GradScaler | None,
    loss_hook: LossHook | None,
    grad_hook: GradHook | None,
    progress: tuple[int, int],
    should_stop: Callable[[], bool] | None = None,
    clip: float | None = None,
) -> bool:
    """Train from ``run.done`` to ``run.total`` iterations; ``net`` runs forward/backward
    (the model or its DDP wrapper), the hooks get ``model``. Returns True when
    ``should_stop()`` (asked after each iteration but the epoch's last) ended it early.
    With ``clip`` the gradient norm is clipped to it (after AMP's unscaling, before the
    sparsity ``grad_hook``)."""
    net.train()
    if run.done >= run.total:
        return False
    bar = tqdm(loader, total=run.total - run.done, desc=f"epoch {epoch}", leave=False, disable=None)
    for images, targets in bar:
        images, targets = _to(device, images, targets)
        with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
            losses = net(images, targets)
            if loss_hook is not None:
                losses = loss_hook(model, images, targets, losses)
            loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch}: loss is {loss.item()} ({losses})")
        optimizers = [optimizer, *hook_optimizers(loss_hook)]  # the model's first
        _backward(loss, optimizers, scaler)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if grad_hook is not None:
            grad_hook(model, (progress[0] + run.done / max(run.total, 1)) / progress[1])
        _step(optimizers, scaler)
        scheduler.step()
        run.done += 1
        for k, v in losses.items():
            run.sums[k] = run.sums.get(k, 0.0) + float(v.detach())
        run.sums["loss"] = run.sums.get("loss", 0.0) + float(loss.detach())
        bar.set_postfix(
            loss=f"{float(loss.detach()):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}"
        )
        if run.done >= run.total:
            break  # before fetching another batch: its transforms would draw random numbers
        if should_stop is not None and should_stop():
            return True
    return False


def _backward(
    loss: torch.Tensor, optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None
) -> None:
    """Zero the gradients of ``optimizers`` (the model's, then a loss hook's own: LCP's
    auxiliary head), backward ``loss``; under AMP unscale every optimizer's gradients."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        return
    scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.unscale_(opt)


def _step(optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None) -> None:
    """Step every optimizer; under AMP GradScaler skips the step of one whose gradients
    hold inf/NaN, then updates its scale."""
    for opt in optimizers:
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
    if scaler is not None:
        scaler.update()


@torch.no_grad()
def predict(
    model: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 8
) -> list[dict]:
    """``model``'s detections on every image of ``dataset`` as COCO result dicts."""
    model.eval()
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0)
    results: list[dict] = []
    for images, targets in tqdm(loader, desc="evaluate", leave=False, disable=None):
        outputs = model([im.to(device) for im in images])
        outputs = [{k: v.cpu() for k, v in o.items()} for o in outputs]
        ids = [int(t["image_id"]) for t in targets]
        results.extend(detections_to_coco(outputs, ids, dataset.label_to_cat))
    return results


def evaluate(
    model: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 8
) -> tuple[dict[str, float | None], str]:
    """COCO box metrics of ``model`` on ``dataset`` through pycocotools."""
    results = predict(model, dataset, device, batch_size)
    return evaluate_detections(dataset.coco, results, image_ids=dataset.ids)


@dataclass
class _Trainer:
    """The state ``fit`` saves and restores: everything an identical continuation needs."""

    ctx: D.DistContext
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    spec: dict[str, Any]
    history: list
    meta: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: Path, epoch: int, run: _EpochRun) -> None:
        """Rank 0 writes the resume point (every rank's RNG state included)."""
        rng = D.gather(D.rng_state(self.ctx.device), self.ctx)
        if self.ctx.is_main:
            checkpoint.save(
                path,
                spec=self.spec,
                model=self.model,
                history=self.history,
                meta=self.meta,
                epoch=epoch,
                iteration=run.done,
                sums=dict(run.sums),
                world=self.ctx.world,
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict() if self.scaler is not None else {},
                rng=rng,
                log=_canonical(self.log),
            )
        D.barrier(self.ctx)

    def restore(self, path: Path, total: int) -> tuple[int, _EpochRun]:
        """(epoch, position in it) from the resume point at ``path``, when it belongs to this
        configuration; else (0, start of the epoch)."""
        fresh = (0, _EpochRun(total=total))
        if not path.is_file():
            return fresh
        state = checkpoint.load(path)
        if state["meta"].get("fingerprint") != self.meta.get("fingerprint"):
            log.warning("ignoring %s: it belongs to another configuration", path)
            return fresh
        if int(state.get("world", 1)) != self.ctx.world:
            log.warning(
                "ignoring %s: written by %s processes, this run has %d",
                path,
                state.get("world", 1),
                self.ctx.world,
            )
            return fresh
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        D.set_rng_state(rng[self.ctx.rank] if isinstance(rng, list) else rng, self.ctx.device)
        self.log = list(state["log"])
        epoch, done = int(state["epoch"]), int(state.get("iteration", 0))
        log.info("resumed from %s at epoch %d, iteration %d", path, epoch, done)
        return epoch, _EpochRun(total=total, done=done, sums=dict(state.get("sums", {})))


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
    final_meta: MetaHook | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``sched['epochs']`` epochs and write the final checkpoint ``out``
    (its meta: ``meta``, the training log, and ``final_meta(model)`` of the trained model).

    After every epoch a resume checkpoint ``<out>.resume.pt`` is written; a later call
    with the same ``meta['fingerprint']`` (and number of processes) continues from it. On
    SIGTERM/SIGUSR1 the current iteration is finished, the resume point written with the
    position in the epoch, and :class:`distributed.Preempted` raised (exit code 75).

    Under torchrun (WORLD_SIZE > 1) the model trains with DistributedDataParallel: each
    process takes ``batch_size`` images of its shard per step and the learning rate is
    ``lr`` x world size (linear scaling rule); BatchNorm layers are synchronised on CUDA
    and keep per-process statistics on the CPU (gloo); rank 0 writes the checkpoints.
    """
    ctx = D.setup(sched.get("device", "auto"))
    try:
        return _fit(
            ctx,
            model,
            spec,
            history,
            sched,
            train_set,
            seed,
            out,
            meta,
            loss_hook,
            grad_hook,
            final_meta,
        )
    finally:
        D.teardown(ctx)


def _fit(
    ctx: D.DistContext,
    model: nn.Module,
    spec: dict[str, Any],
    history: list,
    sched: Mapping[str, Any],
    train_set: Dataset,
    seed: int,
    out: Path,
    meta: dict[str, Any],
    loss_hook: LossHook | None,
    grad_hook: GradHook | None,
    final_meta: MetaHook | None,
) -> dict[str, Any]:
    device, epochs, batch = ctx.device, sched["epochs"], sched["batch_size"]
    if ctx.world > 1:
        D.seed_rank(seed, ctx.rank)
    model.to(device)
    optimizer = build_optimizer(model, {**sched, "lr": sched["lr"] * ctx.world})
    iters = epoch_iters(len(train_set), batch, ctx.world, sched.get("max_iters_per_epoch"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(sched, iters))
    use_amp = bool(sched.get("amp", False)) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    tr = _Trainer(ctx, model, optimizer, scheduler, scaler, spec, history, meta)
    resume = Path(f"{out}.resume.pt")
    start, run = tr.restore(resume, iters)
    swapped = D.sync_batchnorm(model) if ctx.world > 1 and device.type == "cuda" else []
    net = D.wrap(model, ctx)
    if ctx.world > 1:
        log.info(
            "rank %d of %d on %s: global batch %d, lr %g",
            ctx.rank,
            ctx.world,
            device,
            batch * ctx.world,
            sched["lr"] * ctx.world,
        )

    def should_stop() -> bool:
        return D.any_rank(D.stop_requested() is not None, ctx)

    with D.preemption_guard():
        for epoch in range(start, epochs):
            loader = make_loader(
                train_set,
                batch,
                shuffle=True,
                seed=seed,
                epoch=epoch,
                rank=ctx.rank,
                world=ctx.world,
                skip=run.done,
                limit=iters,
            )
            stopped = _run_epoch(
                net,
                model,
                optimizer,
                scheduler,
                loader,
                device,
                epoch,
                run,
                scaler=scaler,
                loss_hook=loss_hook,
                grad_hook=grad_hook,
                progress=(epoch, epochs),
                should_stop=should_stop,
                clip=sched.get("clip_grad_norm"),
            )
            if stopped:
                tr.save(resume, epoch, run)
                _preempted(epoch, run.done, resume)
            losses = run.means()
            tr.log.append({"epoch": epoch, **losses, "lr": optimizer.param_groups[0]["lr"]})
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in losses.items()})
            run = _EpochRun(total=iters)
            tr.save(resume, epoch + 1, run)
            if epoch + 1 < epochs and should_stop():
                _preempted(epoch + 1, 0, resume)
    D.restore_batchnorm(swapped)
    model.cpu()
    if ctx.is_main:
        checkpoint.save(
            out,
            spec=spec,
            model=model,
            history=history,
            meta={
                **meta,
                **(final_meta(model) if final_meta else {}),
                "train_log": _canonical(tr.log),
            },
            epoch=epochs,
        )
        resume.unlink(missing_ok=True)
    D.barrier(ctx)
    return {"log": tr.log}


def _canonical(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Log entries with interned keys: pickle shares equal keys only when they are the same
    object, so a log restored from a resume point must not change the checkpoint's bytes."""
    return [{sys.intern(str(k)): v for k, v in e.items()} for e in entries]


def _preempted(epoch: int, iteration: int, resume: Path) -> None:
    signum = D.stop_requested() or 0
    log.warning(
        "stopping on signal %d at epoch %d, iteration %d: resume point %s (exit code %d)",
        signum,
        epoch,
        iteration,
        resume,
        D.PREEMPTED_EXIT,
    )
    raise D.Preempted(signum, epoch, iteration)
