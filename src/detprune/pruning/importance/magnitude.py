"""Data-free criteria: magnitude, BN scale (Network Slimming's global |gamma|, GCP's max
|gamma| over a coupled group), geometric median, random."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch
import torch_pruning as tp

if TYPE_CHECKING:
    from detprune.pruning.base import PruneContext

_BN = torch.nn.modules.batchnorm._BatchNorm


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


class SlimImportance(tp.importance.Importance):
    """|gamma| of the BatchNorm layers of a group, compared across the whole network.

    Liu et al., "Learning Efficient Convolutional Networks through Network Slimming",
    ICCV 2017. Detectors also have channels with no BatchNorm behind them (FPN convs,
    linear box heads); those groups are scored by L1 magnitude rescaled so that its median
    equals the network's median |gamma|, so one global threshold covers every layer.
    """

    def __init__(self, median_gamma: float) -> None:
        self.bn = tp.importance.BNScaleImportance(normalizer=None)
        self.l1 = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
        self.median_gamma = median_gamma

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        scores = self.bn(group)
        if scores is not None:
            return scores
        scores = self.l1(group)
        if scores is None:
            return None
        return scores / scores.median().clamp_min(1e-12) * self.median_gamma


def bn_scale_importance(ctx: PruneContext) -> tp.importance.Importance:
    """Network Slimming's |gamma| criterion (see :class:`SlimImportance`)."""
    gammas = [
        m.weight.detach().abs().flatten()
        for m in ctx.model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine
    ]
    median = float(torch.cat(gammas).median()) if gammas else 1.0
    return SlimImportance(median)


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


class GammaImportance(tp.importance.Importance):
    """|gamma| of a coupled group's channels, max over its BatchNorms (OR-merge).

    GCP (Niu et al. 2022) and Network Slimming (Liu et al., ICCV 2017). A group without
    BatchNorm (FPN lateral convs, box-head linears) is scored by its mean L1 weight
    magnitude divided by the group mean (about 1, the scale of unregularized gammas).
    """

    def __init__(self) -> None:
        self.fallback = tp.importance.GroupMagnitudeImportance(
            p=1, group_reduction="mean", normalizer="mean"
        )

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor:
        position = {int(r): i for i, r in enumerate(group[0].root_idxs)}
        score: torch.Tensor | None = None
        for item in group:
            layer = item.dep.target.module
            if not isinstance(layer, _BN) or layer.weight is None:
                continue
            gamma = layer.weight.detach().abs().float().cpu()[list(item.idxs)]
            where = torch.tensor([position[int(r)] for r in item.root_idxs], dtype=torch.long)
            if score is None:
                score = torch.zeros(len(position))
            score.scatter_reduce_(0, where, gamma, reduce="amax")
        if score is None:
            return self.fallback(group).float().cpu()
        return score


def gcp_importance(ctx: PruneContext | None = None) -> tp.importance.Importance:
    """|gamma| of a coupled group, max over its BNs (the OR-merge of coupled masks).

    Niu et al., "Group channel pruning and spatial attention distilling for object
    detection", Applied Intelligence 2022; Liu et al., Network Slimming, ICCV 2017.
    """
    return GammaImportance()
