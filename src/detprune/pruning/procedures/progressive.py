"""GroupFisher-style progressive pruning: train, accumulate importance, remove the least
important channels, repeat until the FLOPs target.

Each step trains ``interval`` iterations on ``ctx.batches()`` at ``lr_scale`` times the
training lr while the mask Fisher of the task loss (TLI) and, for MIEP, of L_info (FOI)
is accumulated; then the least important channels over all prunable torch-pruning groups
go (``(I_TLI + I_FOI) * I_IRI``, divided by the MACs one channel of the group costs when
``normalize_flops``), the accumulators are reset and the optimizer rebuilt. Each step
removes about ``1/steps`` of the MACs still to go; near the target the step shrinks (down
to one channel) so the kept share lands within ``tolerance`` of the target.

Liu et al., "Group Fisher Pruning for Practical Network Compression", ICML 2021; MIEP,
ACM MM 2023 (doi 10.1145/3581783.3612563).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from detprune.evaluation.cost import count_macs
from detprune.pruning.base import Method, PruneContext, PruneResult
from detprune.pruning.importance.fisher import (
    PRUNABLE,
    GroupInfo,
    MaskFisher,
    ProgressiveImportance,
    channel_costs,
    is_out_pruning,
    prunable_groups,
    slots,
)
from detprune.pruning.importance.foi import FeatureRecorder, InfoLoss, object_weights, run_guide
from detprune.pruning.importance.iri import IRIConfig, iri_scores
from detprune.pruning.procedures.oneshot import make_report
from detprune.pruning.procedures.options import PROGRESSIVE, SHARED
from detprune.train.engine import build_optimizer
from detprune.utils.options import defaults

log = logging.getLogger("detprune.prune")

#: The defaults of the progressive procedure's own options (the shared ``prune`` keys come
#: with the context's options); the pruning summary records their values.
DEFAULTS: dict[str, Any] = {k: v for k, v in defaults(PROGRESSIVE).items() if k not in SHARED}


def resolve_options(method: Method, options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then the method's preset, then the run's options."""
    return {**DEFAULTS, **method.preset, **options}


def iri_config(opts: Mapping[str, Any], seed: int) -> IRIConfig:
    """IRI's clustering settings from the resolved options."""
    return IRIConfig(
        opts["iri_algorithm"],
        opts["iri_stop"],
        float(opts["iri_ratio"]),
        float(opts["iri_distance"]),
        opts["iri_linkage"],
        float(opts["iri_lambda"]),
        seed,
        bool(opts["iri_normalize"]),
    )


def min_widths(
    dg: tp.DependencyGraph, groups: list[GroupInfo], original: dict[str, int], max_ratio: float
) -> dict[str, int]:
    """Fewest channels each group may keep: no layer below ``1 - max_ratio`` of its original
    width, and never 0."""
    out = {}
    for info in groups:
        keep = 1
        for item in info.group:
            name = dg._module2name.get(item.dep.target.module)
            if name in original and is_out_pruning(dg, item.dep):
                keep = max(keep, math.ceil(round((1 - max_ratio) * original[name], 6)))
        out[info.root_name] = keep
    return out


def select_channels(
    groups: list[GroupInfo],
    scores: Mapping[str, torch.Tensor],
    costs: Mapping[str, float],
    keep: Mapping[str, int],
    *,
    remaining: float,
    budget: float,
    allowance: float,
    count: int | None = None,
) -> list[tuple[GroupInfo, list[int]]]:
    """The least important channels over all groups: take them in ascending score until
    ``count`` channels (or ``budget`` MACs) are taken or the target (``remaining`` MACs) is
    reached, skipping any that would exceed ``allowance`` MACs or a group's ``keep``. A
    group with channel groups gives up one slot of every block at a time, and keeps at
    least two channels per block."""
    cands = sorted(
        (s, info.root_name, idxs)
        for info in groups
        for s, idxs in slots(scores[info.root_name], info.channel_groups)
    )
    by_name = {info.root_name: info for info in groups}
    taken: dict[str, list[int]] = {}
    total = 0.0
    for _, name, idxs in cands:
        info = by_name[name]
        k = len(idxs)
        floor = keep[name] if k == 1 else max(keep[name], 2 * k)
        cost = costs[name] * k
        if len(taken.get(name, [])) + k > info.width - floor or total + cost > allowance:
            continue
        taken.setdefault(name, []).extend(idxs)
        total += cost
        n = sum(len(v) for v in taken.values())
        if total >= remaining or (n >= count if count else total >= budget):
            break
    return [(by_name[n], sorted(v)) for n, v in taken.items()]


def _dims(module: nn.Module) -> int:
    """in x out channels a conv / linear multiplies per output position."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups * module.out_channels
    return module.in_features * module.out_features


class LayerMacs:
    """MACs of every conv / linear layer as the model shrinks.

    Counted once (``count_macs`` at the entry's input size and RoI budget) as MACs per
    (input x output channel) unit, which pruning leaves unchanged, then scaled by the
    current widths; the totals are rescaled to ``ctx.macs_fn``'s count.
    """

    def __init__(self, model: nn.Module, ctx: PruneContext) -> None:
        kwargs = ctx.spec.get("kwargs", {})
        size = int(kwargs.get("image_size", ctx.entry.image_size))
        rois = int(kwargs.get("rpn_post_nms_top_n_test", 0)) if ctx.entry.per_roi_modules else 0
        per_layer = count_macs(
            model, size, per_roi_modules=ctx.entry.per_roi_modules, rois_per_image=rois
        )["per_layer"]
        self.unit = {n: v / _dims(model.get_submodule(n)) for n, v in per_layer.items()}

    def __call__(self, model: nn.Module, total: float) -> dict[str, float]:
        cur = {n: u * _dims(model.get_submodule(n)) for n, u in self.unit.items()}
        scale = total / max(sum(cur.values()), 1.0)
        return {n: v * scale for n, v in cur.items()}


@dataclass
class FOIState:
    """What L_info needs during the pruning stage."""

    student: FeatureRecorder
    guide: FeatureRecorder
    loss: InfoLoss
    optimize: bool
    weight: float
    guide_batch_stats: bool = True


def _on_device(example: Any, device: torch.device) -> Any:
    if torch.is_tensor(example):
        return example.to(device)
    return [x.to(device) for x in example]


@torch.no_grad()
def _example_features(
    foi: FOIState, model: nn.Module, example: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Neck features of the student and of the guide on the tracing example (eval mode)."""
    was = model.training
    model.eval()
    with foi.student.record():
        model(example)
    model.train(was)
    feats, _ = run_guide(foi.guide, example, None)
    return foi.student.feats, feats


def _make_foi(ctx: PruneContext, model: nn.Module, guide: nn.Module, opts: dict) -> FOIState:
    if not ctx.entry.neck_outputs:
        raise ValueError(f"{ctx.spec.get('name')}: FOI needs the entry's neck_outputs")
    if opts["foi_guide_bn"] not in ("batch", "eval"):
        raise ValueError(f"foi_guide_bn must be batch or eval, got {opts['foi_guide_bn']!r}")
    guide = guide.to(ctx.device).eval().requires_grad_(False)
    foi = FOIState(
        FeatureRecorder(model, ctx.entry.neck_outputs, ctx.entry.cls_logits),
        FeatureRecorder(guide, ctx.entry.neck_outputs, ctx.entry.cls_logits),
        InfoLoss(opts["foi_similarity"], bool(opts["foi_objectness"])),
        bool(opts["foi_optimize"]),
        float(opts["foi_weight"]),
        opts["foi_guide_bn"] == "batch",
    )
    foi.loss.setup(*_example_features(foi, model, _on_device(ctx.example, ctx.device)))
    return foi


def train_step(
    model: nn.Module,
    batch: tuple[list, list],
    fisher: MaskFisher,
    optimizer: torch.optim.Optimizer,
    foi: FOIState | None,
    clip: float | None = None,
) -> dict[str, float]:
    """One training iteration that also folds the mask gradients into the Fisher; with
    ``clip``, the gradient norm over the optimizer's parameters is clipped to it."""
    images, targets = batch
    model.train()
    with fisher.masks(len(images)), foi.student.record() if foi else nullcontext():
        losses = model(images, targets)
    task = sum(losses.values())
    if not torch.isfinite(task):
        raise FloatingPointError(f"progressive pruning: loss is {task.item()} ({losses})")
    optimizer.zero_grad(set_to_none=True)
    out = {"loss": float(task.detach())}
    info = None
    if foi is not None:
        feats, logits = run_guide(foi.guide, images, len(foi.student.logits), foi.guide_batch_stats)
        weights = object_weights(foi.student.feats, foi.student.logits, logits)
        info = foi.weight * foi.loss(foi.student.feats, feats, weights)
        out["info"] = float(info.detach())
    task.backward(retain_graph=info is not None)
    fisher.collect("tli")
    if info is not None:
        if foi.optimize:
            info.backward()
        else:  # pruning only: the gradient reaches the masks and the adapters, not the model
            info.backward(inputs=fisher.mask_tensors() + list(foi.loss.parameters()))
        fisher.collect("foi")
    if clip is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        out["clipped"] = float(not norm <= clip)
    optimizer.step()
    return out


def procedure(ctx: PruneContext, method: Method, target: float) -> PruneResult:
    """Progressive pruning of ``ctx.model`` (in place) to ``target`` of its MACs."""
    start = time.perf_counter()
    opts = resolve_options(method, ctx.options)
    tol = float(opts.get("tolerance", 0.02))
    model = ctx.model.to(ctx.device)
    original = copy.deepcopy(model)
    base = ctx.macs_fn(model)
    macs = base
    example = _on_device(ctx.example, ctx.device)
    model.eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=(example,))
    widths = {
        n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, PRUNABLE)
    }
    counter = LayerMacs(model, ctx)
    foi = None
    if opts["foi"]:
        foi = _make_foi(ctx, model, ctx.teacher if ctx.teacher is not None else original, opts)
    iri = iri_config(opts, ctx.seed) if opts["iri"] else None
    sched = ctx.schedule
    optim_cfg = {
        "lr": float(sched.get("lr", 0.01)) * float(opts["lr_scale"]),
        "momentum": float(sched.get("momentum", 0.9)),
        "weight_decay": float(sched.get("weight_decay", 1e-4)),
    }
    clip = None if opts["clip_grad_norm"] is None else float(opts["clip_grad_norm"])
    batches = ctx.batches()
    steps: list[dict[str, Any]] = []
    iterations, training, clipped = 0, 0.0, 0
    while macs / base > target and len(steps) < int(opts["max_steps"]):
        groups = prunable_groups(dg, model, ctx.ignored)
        fisher = MaskFisher(model, groups, opts["coupling"])
        optimizer = build_optimizer(model, optim_cfg)
        if foi is not None:
            optimizer.add_param_group({"params": list(foi.loss.parameters()), "weight_decay": 0.0})
        tick = time.perf_counter()
        logs = [
            train_step(model, next(batches), fisher, optimizer, foi, clip)
            for _ in range(int(opts["interval"]))
        ]
        training += time.perf_counter() - tick
        iterations += len(logs)
        model.eval()
        layer_macs = counter(model, macs)
        costs = {g.root_name: channel_costs(dg, g, layer_macs) for g in groups}
        imp = ProgressiveImportance(
            fisher,
            dg,
            groups,
            tli=bool(opts["tli"]),
            foi=foi is not None,
            iri=None if iri is None else partial(iri_scores, dg, cfg=iri),
            costs=costs if opts["normalize_flops"] else None,
        )
        scores = {g.root_name: imp(g.group) for g in groups}
        # aim a little below the target (first-order costs overestimate what goes), never
        # past half the tolerance
        remaining = macs - target * (1 - tol / 4) * base
        planned = max(int(opts["steps"]) - len(steps), 1)
        chosen = select_channels(
            groups,
            scores,
            costs,
            min_widths(dg, groups, widths, float(opts.get("max_layer_ratio", 0.9))),
            remaining=remaining,
            budget=remaining / planned,
            allowance=macs - target * (1 - tol / 2) * base,
            count=opts["channels_per_step"],
        )
        if not chosen:
            log.warning("progressive pruning: no channel left to prune at %.4f", macs / base)
            break
        for info, idxs in chosen:
            group = dg.get_pruning_group(info.root_module, info.pruning_fn, idxs)
            if dg.check_pruning_group(group):
                group.prune()
        macs = ctx.macs_fn(model)
        if foi is not None and foi.loss.refit(*_example_features(foi, model, example)):
            log.info("neck pruned: FOI adapters refitted")
        mean = {k: sum(d[k] for d in logs) / len(logs) for k in logs[0] if k != "clipped"}
        clipped += sum(int(d.get("clipped", 0)) for d in logs)
        steps.append({"kept": macs / base, "channels": sum(len(i) for _, i in chosen), **mean})
        log.info(
            "step %d: removed %d channels, kept %.4f of MACs (target %.3f), loss %.3f",
            len(steps),
            steps[-1]["channels"],
            macs / base,
            target,
            mean["loss"],
        )
    model.eval()
    report = make_report(
        original,
        model,
        target,
        base,
        macs,
        tol,
        steps=len(steps),
        iterations=iterations,
        clipped_iterations=clipped,
        seconds=time.perf_counter() - start,
        seconds_training=training,
        progress=steps,
        options={k: opts[k] for k in DEFAULTS},
    )
    return PruneResult(model, dg.pruning_history(), report)
