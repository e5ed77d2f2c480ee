"""Data-free criteria: magnitude, BN scale, geometric median, random."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch
import torch_pruning as tp

if TYPE_CHECKING:
    from detprune.pruning.core import PruneContext


def l1_importance(ctx: PruneContext | None = None) -> tp.importance.Importance:
    """Group L1 magnitude: the mean |w| of a channel, summed over its coupled layers.

    Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017; grouped over coupled
    layers as in Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
    """
    return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="mean")


def group_l2_importance(ctx: PruneContext | None = None) -> tp.importance.Importance:
    """Group L2 norm over all coupled parameters of a channel (after group sparse training).

    Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
    """
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")


def bn_scale_importance(ctx: PruneContext | None = None) -> tp.importance.Importance:
    """|gamma| of the BatchNorm layers of a group (after L1 sparse training of the scales).

    Liu et al., "Learning Efficient Convolutional Networks through Network Slimming",
    ICCV 2017.
    """
    return tp.importance.BNScaleImportance(normalizer=None)


def fpgm_importance(ctx: PruneContext | None = None) -> tp.importance.Importance:
    """Distance of each filter to the others (geometric-median redundancy): a filter close
    to the rest is replaceable and goes first.

    He et al., "Filter Pruning via Geometric Median for Deep Convolutional Neural Network
    Acceleration", CVPR 2019.
    """
    return tp.importance.FPGMImportance(p=2, normalizer=None)


class SeededRandomImportance(tp.importance.Importance):
    """Uniform random channel scores, repeatable for a seed and a layer.

    The random baseline of channel-pruning studies (e.g. Liu et al., "Rethinking the
    Value of Network Pruning", ICLR 2019). Scores depend only on (seed, root layer), so
    every call on the same group returns the same ranking.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor:
        root = group[0].dep.target
        key = zlib.crc32(f"{self.seed}:{root.name}".encode())
        gen = torch.Generator().manual_seed(key)
        return torch.rand(len(group[0].idxs), generator=gen)


def random_importance(ctx: PruneContext) -> tp.importance.Importance:
    """Random channels, seeded by the run's seed."""
    return SeededRandomImportance(ctx.seed)
