"""What a pruning method is (the registry itself is :mod:`detprune.pruning.methods`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from detprune.pruning.core import PruneContext, PruneResult, oneshot

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
    distillation of its fine-tuning; ``family`` groups a method with its ablations.

    ``scratch_of`` names the method whose architecture this one retrains from scratch
    (Liu et al., ICLR 2019, "Rethinking the Value of Network Pruning"): its prune stage
    gets that method's *pruned* checkpoint at the same FLOPs target and seed instead of
    the baseline, keeps its widths, re-initialises every weight
    (:func:`detprune.pruning.scratch.from_scratch`), and its fine-tuning stage trains it
    with the baseline's ``train`` schedule. Such an entry is named
    ``detprune.config.SCRATCH_PREFIX + scratch_of`` (``scratch-l1``): the config layer
    tells it by the name without importing the registry (and torch).
    """

    description: str
    importance: ImportanceFactory | None = None
    procedure: Procedure = oneshot
    global_pruning: bool = True
    needs_gradients: bool = False
    sparsity: str | None = None
    distill: str | None = None
    family: str = "baseline"
    scratch_of: str | None = None
