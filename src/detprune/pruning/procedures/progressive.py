"""GroupFisher-style progressive pruning: train, accumulate importance, remove the least
important channels, repeat until the FLOPs target.

Each step trains ``interval`` iterations on ``ctx.batches()`` at ``lr_scale`` times the
training lr while the mask Fisher of the task loss (TLI) and, for MIEP, of L_info (FOI)
is accumulated; then the least important channels over all prunable torch-pruning groups
go (``(I_TLI + I_FOI) * I_IRI``, divided by the MACs one channel of the group costs when
``normalize_flops``), the accumulators are reset and the optimizer rebuilt. Each step
removes about ``1/steps`` of the MACs still to go; near the target the step shrinks (down
to one channel) so the kept share lands within ``tolerance`` of the target. Each step's
entry of the report's ``progress`` also logs the totals of the importance terms, IRI's
overlap with magnitude and L_info over the task loss (:mod:`.miep`).

Liu et al., "Group Fisher Pruning for Practical Network Compression", ICML 2021; MIEP,
ACM MM 2023 (doi 10.1145/3581783.3612563).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Mapping
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
from detprune.pruning.importance.foi import object_weights, run_guide
from detprune.pruning.importance.iri import IRIConfig, iri_scores
from detprune.pruning.procedures.miep import (
    FOIState,
    adapter_modules,
    dependency_graph,
    example_features,
    loss_ratio,
    make_foi,
    on_device,
    step_terms,
)
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


@dataclass
class Run:
    """The state of a progressive run between its steps."""

    ctx: PruneContext
    opts: dict[str, Any]
    model: nn.Module
    dg: tp.DependencyGraph
    foi: FOIState | None
    iri: IRIConfig | None
    widths: dict[str, int]
    counter: LayerMacs
    base: float
    macs: float


def score_step(
    run: Run, groups: list[GroupInfo], fisher: MaskFisher
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
    """The scores of every group after a step's training, the MACs one of its channels
    costs, and the importance terms for the step's log (:func:`miep.step_terms`)."""
    dg, opts = run.dg, run.opts
    layer_macs = run.counter(run.model, run.macs)
    costs = {g.root_name: channel_costs(dg, g, layer_macs) for g in groups}
    skip = adapter_modules(run.foi)
    imp = ProgressiveImportance(
        fisher,
        dg,
        groups,
        tli=bool(opts["tli"]),
        foi=run.foi is not None,
        iri=None if run.iri is None else partial(iri_scores, dg, cfg=run.iri, skip=skip),
        costs=costs if opts["normalize_flops"] else None,
    )
    terms = step_terms(imp, opts, run.iri)
    return {g.root_name: imp(g.group) for g in groups}, costs, terms


def choose(
    run: Run, groups: list[GroupInfo], scores: dict, costs: dict, done: int, target: float
) -> list[tuple[GroupInfo, list[int]]]:
    """The channels this step removes: about ``1/steps`` of the MACs still to go."""
    opts, tol = run.opts, float(run.opts.get("tolerance", 0.02))
    # aim a little below the target (first-order costs overestimate what goes), never
    # past half the tolerance
    remaining = run.macs - target * (1 - tol / 4) * run.base
    planned = max(int(opts["steps"]) - done, 1)
    return select_channels(
        groups,
        scores,
        costs,
        min_widths(run.dg, groups, run.widths, float(opts.get("max_layer_ratio", 0.9))),
        remaining=remaining,
        budget=remaining / planned,
        allowance=run.macs - target * (1 - tol / 2) * run.base,
        count=opts["channels_per_step"],
    )


def prune_chosen(run: Run, chosen: list[tuple[GroupInfo, list[int]]], example: Any) -> None:
    """Remove the chosen channels through their torch-pruning groups (FOI's adapters
    with them under ``foi_adapter: prune``; refitted after under ``refit``)."""
    for info, idxs in chosen:
        group = run.dg.get_pruning_group(info.root_module, info.pruning_fn, idxs)
        if run.dg.check_pruning_group(group):
            group.prune()
    run.macs = run.ctx.macs_fn(run.model)
    foi = run.foi
    refit = foi is not None and foi.loss.adapter == "refit"
    if refit and foi.loss.refit(*example_features(foi, run.model, example)):
        log.info("neck pruned: FOI adapters refitted")


def start(ctx: PruneContext, opts: dict[str, Any], example: Any) -> tuple[Run, nn.Module]:
    """The run's state before its first step, and a copy of the unpruned model."""
    model = ctx.model.to(ctx.device)
    original = copy.deepcopy(model)
    widths = {
        n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, PRUNABLE)
    }
    counter = LayerMacs(model, ctx)
    foi = None
    if opts["foi"]:
        foi = make_foi(ctx, model, ctx.teacher if ctx.teacher is not None else original, opts)
    model.eval()
    dg = dependency_graph(model, example, foi)
    iri = iri_config(opts, ctx.seed) if opts["iri"] else None
    base = ctx.macs_fn(model)
    return Run(ctx, opts, model, dg, foi, iri, widths, counter, base, base), original


def train_interval(
    run: Run, groups: list[GroupInfo], batches: Iterator, optim_cfg: dict, clip: float | None
) -> tuple[MaskFisher, list[dict[str, float]]]:
    """A step's ``interval`` training iterations, accumulating the mask Fisher of every
    group (the optimizer rebuilt for the current widths, FOI's adapters with it)."""
    model, foi = run.model, run.foi
    fisher = MaskFisher(model, groups, run.opts["coupling"])
    optimizer = build_optimizer(model, optim_cfg)
    if foi is not None:
        optimizer.add_param_group({"params": list(foi.loss.parameters()), "weight_decay": 0.0})
    logs = [
        train_step(model, next(batches), fisher, optimizer, foi, clip)
        for _ in range(int(run.opts["interval"]))
    ]
    model.eval()
    return fisher, logs


def step_record(run: Run, chosen: list, logs: list[dict[str, float]], terms: dict) -> dict:
    """The step's entry of the report's ``progress``: MACs kept, channels removed, the mean
    losses (and L_info over the task loss), the importance terms (:func:`miep.step_terms`)."""
    mean = {k: sum(d[k] for d in logs) / len(logs) for k in logs[0] if k != "clipped"}
    channels = sum(len(i) for _, i in chosen)
    return {"kept": run.macs / run.base, "channels": channels, **mean, **loss_ratio(mean), **terms}


def procedure(ctx: PruneContext, method: Method, target: float) -> PruneResult:
    """Progressive pruning of ``ctx.model`` (in place) to ``target`` of its MACs."""
    began = time.perf_counter()
    opts = resolve_options(method, ctx.options)
    example = on_device(ctx.example, ctx.device)
    run, original = start(ctx, opts, example)
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
    while run.macs / run.base > target and len(steps) < int(opts["max_steps"]):
        groups = prunable_groups(run.dg, run.model, ctx.ignored, adapter_modules(run.foi))
        tick = time.perf_counter()
        fisher, logs = train_interval(run, groups, batches, optim_cfg, clip)
        training += time.perf_counter() - tick
        iterations += len(logs)
        scores, costs, terms = score_step(run, groups, fisher)
        chosen = choose(run, groups, scores, costs, len(steps), target)
        if not chosen:
            log.warning("progressive pruning: no channel left at %.4f", run.macs / run.base)
            break
        prune_chosen(run, chosen, example)
        clipped += sum(int(d.get("clipped", 0)) for d in logs)
        steps.append(step_record(run, chosen, logs, terms))
        log.info(
            "step %d: removed %d channels, kept %.4f of MACs (target %.3f), loss %.3f",
            len(steps),
            steps[-1]["channels"],
            steps[-1]["kept"],
            target,
            steps[-1]["loss"],
        )
    run.model.eval()
    report = make_report(
        original,
        run.model,
        target,
        run.base,
        run.macs,
        float(opts.get("tolerance", 0.02)),
        steps=len(steps),
        iterations=iterations,
        clipped_iterations=clipped,
        seconds=time.perf_counter() - began,
        seconds_training=training,
        progress=steps,
        options={k: opts[k] for k in DEFAULTS},
    )
    return PruneResult(run.model, run.dg.pruning_history(), report)
