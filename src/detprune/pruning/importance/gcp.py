"""GCP's criterion: |gamma| of a coupled group, max over its BatchNorms.

Niu et al., "Group channel pruning and spatial attention distilling for object
detection", Applied Intelligence 2022 (arXiv 2306.01526); the procedure that uses it is
:mod:`detprune.pruning.procedures.gcp`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch_pruning as tp
from torch import nn

if TYPE_CHECKING:
    from detprune.pruning.base import PruneContext

_BN = nn.modules.batchnorm._BatchNorm


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
