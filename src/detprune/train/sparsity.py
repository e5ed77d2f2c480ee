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

GradHook = Callable[[nn.Module, float], None]


@dataclass
class SparsityContext:
    """What a regularizer may need: options from ``sparse.regularizers.<name>``, the
    layers that are never pruned, and an example input for dependency tracing."""

    options: dict[str, Any]
    ignored: list[str]
    example: list[torch.Tensor]


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
    s = float(ctx.options.get("s", 1e-4))
    bns = _prunable_bns(model, ctx.ignored)

    @torch.no_grad()
    def hook(model: nn.Module, progress: float) -> None:
        for bn in bns:
            if bn.weight.grad is not None:
                bn.weight.grad.add_(s * torch.sign(bn.weight))

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
        reg=float(ctx.options.get("reg", 5e-4)),
        ignored_layers=[model.get_submodule(n) for n in ctx.ignored],
    )
    model.train(was)

    def hook(model: nn.Module, progress: float) -> None:
        pruner.regularize(model)

    return hook


REGULARIZERS: dict[str, Callable[[nn.Module, SparsityContext], GradHook]] = {
    "bn_l1": bn_l1,
    "group_l2": group_l2,
}
