"""Sparse-training regularizers, applied to the gradients between backward and step.

``REGULARIZERS`` maps a name (used by :class:`detprune.pruning.methods.Method.sparsity`
and as the cached rule's output name) to a factory ``fn(model, ctx) -> hook`` where
``hook(model, progress)`` adds the penalty's subgradient to ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from detprune.train.options import REGULARIZER_OPTIONS
from detprune.utils.options import defaults

GradHook = Callable[[nn.Module, float], None]


@dataclass
class SparsityContext:
    """What a regularizer may need: options from ``sparse.regularizers.<name>``, the
    layers that are never pruned, and an example input for dependency tracing."""

    options: dict[str, Any]
    ignored: list[str]
    example: torch.Tensor


def _options(name: str, ctx: SparsityContext) -> dict[str, Any]:
    """The declared defaults of regularizer ``name`` with ``ctx.options`` over them."""
    return {**defaults(REGULARIZER_OPTIONS[name]), **ctx.options}


def _prunable_bns(model: nn.Module, ignored: list[str]) -> list[nn.BatchNorm2d]:
    return [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not any(n.startswith(i) for i in ignored)
    ]


def bn_l1(model: nn.Module, ctx: SparsityContext) -> GradHook:
    """L1 penalty on BatchNorm scales, gamma.grad += s * sign(gamma), constant rate s.

    Liu et al., "Learning Efficient Convolutional Networks through Network Slimming",
    ICCV 2017 (s = 1e-4 in the paper; ``sparse.regularizers.bn_l1.s``).
    """
    s = float(_options("bn_l1", ctx)["s"])
    bns = _prunable_bns(model, ctx.ignored)

    @torch.no_grad()
    def hook(model: nn.Module, progress: float) -> None:
        for bn in bns:
            if bn.weight.grad is not None:
                bn.weight.grad.add_(s * torch.sign(bn.weight))

    return hook


def dynamic_rates(
    gammas: torch.Tensor,
    s: float,
    progress: float,
    *,
    switch: float = 0.4,
    percentile: float = 65.0,
    factor: float = 0.01,
) -> torch.Tensor:
    """The per-channel sparse rate of the dynamic schedule for the scales ``gammas``.

    ``s`` everywhere before ``switch`` (a fraction of the schedule); from then on,
    channels whose |gamma| is at or above the ``percentile``-th percentile of all the
    regularized |gamma| get ``factor * s``. ``factor = 1`` or ``switch >= 1`` gives
    Network Slimming's constant rate.
    """
    rates = torch.full_like(gammas, s)
    if switch < 1 and factor != 1 and progress >= switch and gammas.numel():
        mags = gammas.detach().abs().float()
        threshold = torch.quantile(mags, percentile / 100.0)
        rates[mags >= threshold] = factor * s
    return rates


def bn_l1_dynamic(model: nn.Module, ctx: SparsityContext) -> GradHook:
    """L1 on BatchNorm scales with a sparse rate that changes with training progress.

    Niu et al., "Group channel pruning and spatial attention distilling for object
    detection", Applied Intelligence 2022 (arXiv 2306.01526): gamma.grad += r * sign(gamma)
    with r = s until ``switch`` (0.4) of the schedule, then r = ``factor`` (0.01) * s on
    the channels whose |gamma| is at or above the ``percentile`` (65th) of all regularized
    scales (one percentile over every prunable BN, recomputed at each step), so that
    important channels recover while the rest keep being pushed to zero. ``s`` defaults
    to 1e-3 (the authors' README). ``factor: 1`` or ``switch: 1`` is Network Slimming.
    """
    opts = _options("bn_l1_dynamic", ctx)
    s = float(opts["s"])
    switch = float(opts["switch"])
    percentile = float(opts["percentile"])
    factor = float(opts["factor"])
    if not 0 <= percentile <= 100:
        raise ValueError(
            f"sparse.regularizers.bn_l1_dynamic.percentile: {percentile} not in 0..100"
        )
    bns = _prunable_bns(model, ctx.ignored)
    bns = [bn for bn in bns if bn.weight is not None]

    @torch.no_grad()
    def hook(model: nn.Module, progress: float) -> None:
        live = [bn for bn in bns if bn.weight.grad is not None]
        if not live:
            return
        gammas = torch.cat([bn.weight.detach().flatten() for bn in live])
        rates = dynamic_rates(
            gammas, s, progress, switch=switch, percentile=percentile, factor=factor
        )
        start = 0
        for bn in live:
            n = bn.weight.numel()
            rate = rates[start : start + n].view_as(bn.weight).to(bn.weight.grad.dtype)
            bn.weight.grad.add_(rate * torch.sign(bn.weight))
            start += n

    return hook


def group_l2(model: nn.Module, ctx: SparsityContext) -> GradHook:
    """Group-norm sparsity over coupled channels (torch-pruning's GroupNormPruner).

    Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (``reg`` 5e-4).
    """
    was = model.training
    model.eval()
    pruner = tp.pruner.GroupNormPruner(
        model,
        example_inputs=(ctx.example,),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        reg=float(_options("group_l2", ctx)["reg"]),
        ignored_layers=[model.get_submodule(n) for n in ctx.ignored],
    )
    model.train(was)

    def hook(model: nn.Module, progress: float) -> None:
        pruner.regularize(model)

    return hook


REGULARIZERS: dict[str, Callable[[nn.Module, SparsityContext], GradHook]] = {
    "bn_l1": bn_l1,
    "bn_l1_dynamic": bn_l1_dynamic,
    "group_l2": group_l2,
}


#: thresholds and quantiles (in %) of :func:`gamma_histogram`
GAMMA_THRESHOLDS = {"1e-2": 1e-2, "1e-3": 1e-3}
GAMMA_QUANTILES = (5, 25, 50, 75, 95)


@torch.no_grad()
def gamma_histogram(model: nn.Module) -> dict[str, Any]:
    """The |gamma| distribution over the scales of every BatchNorm layer of ``model``.

    ``layers`` and ``count`` (scales), ``share_below`` {"1e-2", "1e-3"}: the share of
    |gamma| strictly below each, and ``quantiles`` {"p5" .. "p95"} (linear interpolation).
    Recorded before and after sparse training, it shows how far a regularizer on the BN
    scales (Network Slimming's, GCP's dynamic rate; Liu et al. ICCV 2017, Niu et al.
    Applied Intelligence 2022) pushed them towards zero before the |gamma| ranking prunes.
    """
    scales = [
        m.weight.detach().abs().flatten().double().cpu()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    out: dict[str, Any] = {"layers": len(scales), "count": sum(s.numel() for s in scales)}
    if not out["count"]:
        return out
    gammas = torch.cat(scales)
    out["share_below"] = {
        k: float((gammas < t).double().mean()) for k, t in GAMMA_THRESHOLDS.items()
    }
    levels = torch.tensor([q / 100 for q in GAMMA_QUANTILES], dtype=torch.float64)
    values = torch.quantile(gammas, levels).tolist()
    out["quantiles"] = {f"p{q}": v for q, v in zip(GAMMA_QUANTILES, values, strict=True)}
    return out


def describe_gammas(stats: dict[str, Any]) -> str:
    """One line of :func:`gamma_histogram`'s record."""
    if not stats.get("count"):
        return "no BatchNorm scales"
    below = ", ".join(f"{v:.1%} < {k}" for k, v in stats["share_below"].items())
    quant = " ".join(f"{k} {v:.3g}" for k, v in stats["quantiles"].items())
    return f"{stats['count']} |gamma| in {stats['layers']} BN layers: {below}; {quant}"
