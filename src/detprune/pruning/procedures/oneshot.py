"""The one-shot procedure and the surgery every procedure shares: torch-pruning to a
target share of the baseline FLOPs.

A method (see :mod:`detprune.pruning.methods`) supplies an importance callable and a
procedure; :func:`oneshot` scores once, prunes, done. The progressive, stage-wise, GCP
and from-scratch procedures beside this module reuse its pieces (:func:`prune_to_flops`,
:func:`make_report`, :func:`accumulate_gradients`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from detprune.evaluation.cost import count_macs
from detprune.pruning.base import PruneContext, PruneResult
from detprune.pruning.procedures.options import ONESHOT
from detprune.utils.options import defaults

if TYPE_CHECKING:
    from detprune.pruning.base import Batch, Method

log = logging.getLogger("detprune.prune")


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def copy_with_grads(model: nn.Module) -> nn.Module:
    """``deepcopy`` that also carries the parameters' ``.grad`` (deepcopy drops them)."""
    clone = copy.deepcopy(model)
    for src, dst in zip(model.parameters(), clone.parameters(), strict=True):
        if src.grad is not None:
            dst.grad = src.grad.detach().clone()
    return clone


def detection_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The detector's own training loss on one batch (train mode)."""
    images, targets = batch
    return sum(model(images, targets).values())


def accumulate_gradients(model: nn.Module, batches: Iterator[Batch], n: int) -> int:
    """Zero the gradients, then sum the task-loss gradients of ``n`` batches into ``.grad``.

    BatchNorm running statistics are left untouched (BN layers stay in eval mode).
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    model.zero_grad(set_to_none=True)
    done = 0
    for batch in batches:
        if done >= n:
            break
        detection_loss(model, batch).backward()
        done += 1
    model.eval()
    return done


class CappedImportance:
    """Wraps an importance so that global ranking honours ``max_layer_ratio``: the best
    ``ceil((1 - max_ratio) * width)`` channels of every group score +inf and are never
    below the global threshold. (torch-pruning caps only the global ratio; without this a
    layer whose channels all fall under the threshold would be skipped whole, and the kept
    FLOPs would stop falling as the ratio grows: Network Slimming at 10% in the default run.)
    """

    def __init__(self, base: Any, max_ratio: float) -> None:
        self.base = base
        self.max_ratio = max_ratio

    def __call__(self, group: Any, **kwargs: Any) -> torch.Tensor | None:
        imp = self.base(group, **kwargs)
        if imp is None or imp.numel() == 0:
            return imp
        keep = max(math.ceil(round((1 - self.max_ratio) * imp.numel(), 6)), 1)
        imp = imp.clone()
        imp[torch.topk(imp, min(keep, imp.numel())).indices] = float("inf")
        return imp


def make_pruner(
    model: nn.Module,
    ctx_example: torch.Tensor,
    importance: Any,
    ratio: float,
    ignored: list[str],
    opts: dict[str, Any],
    layer_ratios: dict[str, float] | None = None,
) -> tp.pruner.MetaPruner:
    """A torch-pruning MetaPruner with the core's allocation settings (``layer_ratios``:
    per-layer ratios that replace ``ratio`` for those layers)."""
    if opts["global_pruning"]:
        importance = CappedImportance(importance, opts["max_layer_ratio"])
    return tp.pruner.MetaPruner(
        model,
        example_inputs=(ctx_example,),
        importance=importance,
        global_pruning=opts["global_pruning"],
        pruning_ratio=ratio,
        max_pruning_ratio=opts["max_layer_ratio"],
        ignored_layers=[model.get_submodule(n) for n in ignored],
        round_to=opts.get("round_to"),
        pruning_ratio_dict={model.get_submodule(n): r for n, r in (layer_ratios or {}).items()}
        or None,
    )


def prune_once(
    model: nn.Module,
    example: torch.Tensor,
    importance: Any,
    ratio: float,
    ignored: list[str],
    opts: dict[str, Any],
    layer_ratios: dict[str, float] | None = None,
) -> tuple[nn.Module, list]:
    """Prune a copy of ``model`` by global/per-layer ``ratio``; return it and its history."""
    trial = copy_with_grads(model)
    trial.eval()
    pruner = make_pruner(trial, example, importance, ratio, ignored, opts, layer_ratios)
    pruner.step()
    return trial, pruner.DG.pruning_history()


def make_report(
    before: nn.Module,
    after: nn.Module,
    target: float,
    base_macs: int,
    macs_after: int,
    tolerance: float,
    **extra: Any,
) -> dict[str, Any]:
    """What every pruning stage records: FLOPs reached, params, channels per layer."""
    kept = macs_after / base_macs
    err = abs(kept / target - 1)
    if err > tolerance:
        raise RuntimeError(
            f"could not reach {target:.3f} of the FLOPs within {tolerance:.0%} (relative): "
            f"kept {kept:.4f}; raise prune.max_layer_ratio or lower prune.round_to"
        )
    wb, wa = layer_widths(before), layer_widths(after)
    return {
        "flops_target": target,
        "macs_before": base_macs,
        "macs_after": macs_after,
        "flops_kept": kept,
        "relative_error": err,
        "tolerance": tolerance,
        "params_before": sum(p.numel() for p in before.parameters()),
        "params_after": sum(p.numel() for p in after.parameters()),
        "layers": {n: [wa[n], wb[n]] for n in wb},
        **extra,
    }


def prune_to_flops(
    model: nn.Module,
    *,
    importance: Any,
    target: float,
    example: torch.Tensor,
    ignored: list[str],
    macs_fn: Callable[[nn.Module], int],
    global_pruning: bool = True,
    max_layer_ratio: float = 0.9,
    round_to: int | None = None,
    tolerance: float = 0.02,
    max_trials: int = 24,
) -> PruneResult:
    """Physically remove channels until the kept share of MACs is ``target``.

    Bisects torch-pruning's pruning ratio; each trial prunes a fresh copy of ``model``
    (its gradients come along, for data-dependent criteria). The kept share ends within
    ``tolerance`` (relative) of ``target``, or this raises.
    """
    base = macs_fn(model)
    opts = {
        "global_pruning": global_pruning,
        "max_layer_ratio": max_layer_ratio,
        "round_to": round_to,
    }
    lo, hi = 0.0, max_layer_ratio
    best: tuple[float, nn.Module, list, int, float] | None = None
    trials: list[dict[str, Any]] = []

    def attempt(ratio: float, layer_ratios: dict[str, float] | None = None) -> float:
        nonlocal best
        trial, history = prune_once(model, example, importance, ratio, ignored, opts, layer_ratios)
        macs = macs_fn(trial)
        kept = macs / base
        err = abs(kept / target - 1)
        trials.append({"ratio": ratio, "kept": kept, "layers_at_next": len(layer_ratios or {})})
        log.info("pruning ratio %.4f keeps %.4f of MACs (target %.3f)", ratio, kept, target)
        if best is None or err < best[0]:
            best = (err, trial, history, macs, ratio)
        return kept

    for _ in range(max_trials):
        ratio = (lo + hi) / 2
        kept = attempt(ratio)
        if abs(kept / target - 1) <= tolerance / 4:
            break
        if kept > target:
            lo = ratio
        else:
            hi = ratio
        if hi - lo < 1e-4:  # a jump of the kept share: refined below
            break
    assert best is not None
    if best[0] > tolerance / 4 and not global_pruning and lo > 0:
        # Per-layer pruning steps in jumps: at some ratio every layer of one width loses a
        # channel at once. Close the jump between lo (above the target) and hi (below) by
        # moving the layers, in order, one by one from lo to hi (bisected).
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in ignored
        ]
        a, b = 0, len(names)
        while b - a > 1 and best[0] > tolerance / 4:
            k = (a + b) // 2
            if attempt(lo, {n: hi for n in names[:k]}) > target:
                a = k
            else:
                b = k
    _, pruned, history, macs, ratio = best
    report = make_report(
        model,
        pruned,
        target,
        base,
        macs,
        tolerance,
        trials=trials,
        ratio=ratio,
        allocation="global" if global_pruning else "per-layer",
    )
    return PruneResult(pruned, history, report)


def allocate_widths(
    ctx: PruneContext, target: float, opts: dict[str, Any], lookup: Callable[[str], Method]
) -> dict[str, Any]:
    """The report of pruning a copy of ``ctx.model`` to ``target`` with the one-shot
    criterion named by ``opts["allocation"]`` (the method ``lookup`` returns for that
    name): its per-layer widths are the stage-wise procedure's channel budgets."""
    alloc = lookup(str(opts["allocation"]))
    if alloc.importance is None or alloc.sparsity:
        raise ValueError(
            f"prune.options: allocation {opts['allocation']!r} must be a one-shot criterion "
            "without sparse training (e.g. l1, uniform, fpgm, taylor)"
        )
    if alloc.needs_gradients:
        accumulate_gradients(ctx.model, ctx.batches(), int(opts.get("calib_batches", 8)))
    return prune_to_flops(
        ctx.model,
        importance=alloc.importance(ctx),
        target=target,
        example=ctx.example,
        ignored=ctx.ignored,
        macs_fn=ctx.macs_fn,
        global_pruning=bool(opts.get("global_pruning", True)) and alloc.global_pruning,
        max_layer_ratio=float(opts.get("max_layer_ratio", 0.9)),
        round_to=opts.get("round_to"),
        tolerance=float(opts.get("tolerance", 0.02)),
    ).report


def oneshot(ctx: PruneContext, method: Method, target: float) -> PruneResult:
    """Score once (after task-loss gradients when the criterion needs them), prune, done."""
    opts = {**defaults(ONESHOT), **ctx.options}
    if method.needs_gradients:
        n = accumulate_gradients(ctx.model, ctx.batches(), opts["calib_batches"])
        log.info("accumulated task-loss gradients over %d batches", n)
    importance = method.importance(ctx)
    return prune_to_flops(
        ctx.model,
        importance=importance,
        target=target,
        example=ctx.example,
        ignored=ctx.ignored,
        macs_fn=ctx.macs_fn,
        global_pruning=opts["global_pruning"] and method.global_pruning,
        max_layer_ratio=opts["max_layer_ratio"],
        round_to=opts["round_to"],
        tolerance=opts["tolerance"],
    )


def macs_counter(
    image_size: int, per_roi_modules: tuple[str, ...], rois: int
) -> Callable[[nn.Module], int]:
    """A ``macs_fn`` for :func:`prune_to_flops` at a fixed input size and RoI count."""

    def fn(model: nn.Module) -> int:
        return count_macs(model, image_size, per_roi_modules=per_roi_modules, rois_per_image=rois)[
            "macs"
        ]

    return fn
