"""The ``METHODS`` registry: a method is an importance callable plus how it is applied.

To add a method, write an importance factory ``fn(ctx) -> torch-pruning Importance``
(a callable that scores the channels of a coupled group) and add one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from detprune.pruning.core import PruneContext, PruneResult, oneshot
from detprune.pruning.importance.magnitude import (
    bn_scale_importance,
    fpgm_importance,
    group_l2_importance,
    l1_importance,
    random_importance,
)
from detprune.pruning.importance.taylor import taylor_importance

ImportanceFactory = Callable[[PruneContext], Any]
Procedure = Callable[[PruneContext, "Method", float], PruneResult]


@dataclass(frozen=True)
class Method:
    """A pruning method and the stages around it.

    ``importance(ctx)`` returns a torch-pruning importance callable; ``procedure`` prunes
    (default: one shot to the FLOPs target); ``global_pruning`` False makes every layer
    keep the same share; ``needs_gradients`` makes the core accumulate task-loss gradients
    first; ``sparsity`` names a regularizer of :data:`detprune.train.sparsity.REGULARIZERS`
    trained in its own cached stage before pruning; ``distill`` is the default
    distillation of its fine-tuning.
    """

    description: str
    importance: ImportanceFactory | None = None
    procedure: Procedure = oneshot
    global_pruning: bool = True
    needs_gradients: bool = False
    sparsity: str | None = None
    distill: str | None = None


METHODS: dict[str, Method] = {
    "random": Method("random channels (seeded)", random_importance),
    "uniform": Method(
        "uniform width: every layer keeps the same share (Slimmable stand-in)",
        l1_importance,
        global_pruning=False,
    ),
    "l1": Method("group L1 magnitude (Li et al. 2017, DepGraph grouping)", l1_importance),
    "depgraph": Method(
        "DepGraph: group sparse training, then group L2 norm (Fang et al. 2023)",
        group_l2_importance,
        sparsity="group_l2",
    ),
    "slim": Method(
        "Network Slimming: L1 on BN scales, then |gamma| (Liu et al. 2017)",
        bn_scale_importance,
        sparsity="bn_l1",
    ),
    "fpgm": Method("FPGM: geometric-median redundancy (He et al. 2019)", fpgm_importance),
    "taylor": Method(
        "first-order Taylor of the task loss (Molchanov et al. 2019)",
        taylor_importance,
        needs_gradients=True,
    ),
}


def get_method(name: str) -> Method:
    """Look up a method; unknown names get a clear error."""
    if name not in METHODS:
        raise KeyError(f"prune.methods: unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]
