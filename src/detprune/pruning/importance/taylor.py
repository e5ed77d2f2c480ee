"""Gradient criteria."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch_pruning as tp

if TYPE_CHECKING:
    from detprune.pruning.base import PruneContext


def taylor_importance(ctx: PruneContext | None = None) -> tp.importance.Importance:
    """First-order Taylor expansion of the task loss, |w * dL/dw|, summed over the group.

    Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019.
    The core accumulates task-loss gradients over ``prune.calib_batches`` batches first.
    """
    return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean")
