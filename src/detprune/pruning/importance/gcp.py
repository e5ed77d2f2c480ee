"""GCP and GCP+SAD methods (Niu et al., Applied Intelligence 2022, arXiv 2306.01526).

``gcp``: dynamic sparse training of the BN scales (``bn_l1_dynamic``), group channel
pruning to the FLOPs target, plain fine-tuning. ``gcp-sad``: the paper's full pipeline,
the same plus spatial-attention distillation from the unpruned model while fine-tuning.
The two rows differ only by SAD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch_pruning as tp

from detprune.pruning.base import Method
from detprune.pruning.gcp import GammaImportance, gcp_prune

if TYPE_CHECKING:
    from detprune.pruning.core import PruneContext


def gcp_importance(ctx: PruneContext | None = None) -> tp.importance.Importance:
    """|gamma| of a coupled group, max over its BNs (the OR-merge of coupled masks).

    Niu et al., "Group channel pruning and spatial attention distilling for object
    detection", Applied Intelligence 2022; Liu et al., Network Slimming, ICCV 2017.
    """
    return GammaImportance()


GCP_METHODS: dict[str, Method] = {
    "gcp": Method(
        "GCP: dynamic sparse training, group channel pruning, fine-tuning (Niu et al. 2022)",
        gcp_importance,
        procedure=gcp_prune,
        sparsity="bn_l1_dynamic",
        family="gcp",
    ),
    "gcp-sad": Method(
        "GCP+SAD: GCP, fine-tuned with spatial-attention distillation (Niu et al. 2022)",
        gcp_importance,
        procedure=gcp_prune,
        sparsity="bn_l1_dynamic",
        distill="sad",
        family="gcp",
    ),
}
