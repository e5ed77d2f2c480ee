"""Magnitude criteria."""

from __future__ import annotations

from typing import Any

import torch_pruning as tp


def l1_importance(**_: Any) -> tp.importance.Importance:
    """Group L1 magnitude: the mean |w| of a channel summed over its coupled layers.

    Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017; grouped over coupled
    layers as in Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
    """
    return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="mean")
