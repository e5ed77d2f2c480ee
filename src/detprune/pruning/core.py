"""The pruning core: torch-pruning surgery to a target share of the baseline FLOPs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from detprune.evaluation.cost import count_macs

log = logging.getLogger("detprune.prune")


@dataclass
class PruneResult:
    """The pruned model, its torch-pruning history and what was measured."""

    model: nn.Module
    history: list
    report: dict[str, Any]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def _prune_once(model: nn.Module, example: list[torch.Tensor], importance: tp.importance.Importance,
                ratio: float, ignored: list[str], opts: dict[str, Any]) -> tuple[nn.Module, list]:
    """Prune a deep copy of ``model`` by global/per-layer ``ratio``; return it and history."""
    trial = copy.deepcopy(model)
    trial.eval()
    pruner = tp.pruner.MetaPruner(
        trial,
        example_inputs=(example,),
        importance=importance,
        global_pruning=opts["global_pruning"],
        pruning_ratio=ratio,
        max_pruning_ratio=opts["max_layer_ratio"],
        ignored_layers=[trial.get_submodule(n) for n in ignored],
        round_to=opts.get("round_to"),
    )
    pruner.step()
    return trial, pruner.DG.pruning_history()


def prune_to_flops(
    model: nn.Module,
    *,
    importance: tp.importance.Importance,
    target: float,
    example: list[torch.Tensor],
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
    (gradients stored on its parameters come along, for data-dependent criteria). The
    result's kept share is within ``tolerance`` (relative) of ``target`` or it raises.
    """
    base = macs_fn(model)
    opts = {"global_pruning": global_pruning, "max_layer_ratio": max_layer_ratio,
            "round_to": round_to}
    lo, hi = 0.0, max_layer_ratio
    best: tuple[float, nn.Module, list, float] | None = None
    trials = []
    for _ in range(max_trials):
        ratio = (lo + hi) / 2
        trial, history = _prune_once(model, example, importance, ratio, ignored, opts)
        kept = macs_fn(trial) / base
        err = abs(kept / target - 1)
        trials.append({"ratio": ratio, "kept": kept})
        log.info("pruning ratio %.4f keeps %.4f of MACs (target %.3f)", ratio, kept, target)
        if best is None or err < best[0]:
            best = (err, trial, history, kept)
        if err <= tolerance / 4:
            break
        if kept > target:
            lo = ratio
        else:
            hi = ratio
    assert best is not None
    err, pruned, history, kept = best
    if err > tolerance:
        raise RuntimeError(
            f"could not reach {target:.3f} of the FLOPs within {tolerance:.0%}: best kept "
            f"{kept:.4f}; raise prune.max_layer_ratio or lower prune.round_to"
        )
    before, after = layer_widths(model), layer_widths(pruned)
    report = {
        "flops_target": target,
        "macs_before": base,
        "macs_after": int(kept * base),
        "flops_kept": kept,
        "relative_error": err,
        "tolerance": tolerance,
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in pruned.parameters()),
        "layers": {n: [after[n], before[n]] for n in before},
        "trials": trials,
    }
    return PruneResult(pruned, history, report)


def macs_counter(image_size: int, per_roi_modules: tuple[str, ...], rois: int
                 ) -> Callable[[nn.Module], int]:
    """A ``macs_fn`` for :func:`prune_to_flops` at a fixed input size and RoI count."""

    def fn(model: nn.Module) -> int:
        return count_macs(model, image_size, per_roi_modules=per_roi_modules,
                          rois_per_image=rois)["macs"]

    return fn
