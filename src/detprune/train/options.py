"""The options of the sparse-training regularizers (``sparse.regularizers.<name>``) and
of SAD, the spatial-attention distillation (``finetune.methods.<m>.distill_options``),
with defaults and types (no torch: the config check reads them when the config loads).
The implementations, :mod:`detprune.train.sparsity` and :mod:`detprune.train.sad`,
start from these defaults."""

from __future__ import annotations

from detprune.utils.options import Option

#: ``sparse.regularizers.<name>``: the keys of each regularizer of
#: :data:`detprune.train.sparsity.REGULARIZERS`.
REGULARIZER_OPTIONS: dict[str, dict[str, Option]] = {
    # Network Slimming (Liu et al., ICCV 2017): s = 1e-4 in the paper
    "bn_l1": {"s": Option(1e-4, help="L1 rate on the BN scales")},
    # GCP's dynamic rates (Niu et al. 2022)
    "bn_l1_dynamic": {
        "s": Option(1e-3, help="L1 rate on the BN scales"),
        "switch": Option(0.4, help="share of the schedule after which the rates change"),
        "percentile": Option(65.0, help="|gamma| at or above this percentile gets factor * s"),
        "factor": Option(0.01),
    },
    # DepGraph (Fang et al., CVPR 2023)
    "group_l2": {"reg": Option(5e-4, help="group-norm regularization rate")},
}

#: ``finetune.methods.<m>.distill_options`` of ``distill: sad`` (:func:`detprune.train.sad.sad`).
SAD_OPTIONS: dict[str, Option] = {
    "weights": Option(None, (dict, None), help="{group: weight} over the defaults"),
    "taps": Option(None, (dict, None), help="{module: group}; default: the entry's distill_taps"),
    "output": Option(False, help="also distil the class logits (KL) and boxes (L2)"),
    "temperature": Option(3.0),
    "kl_weight": Option(1e-3),
    "box_weight": Option(1e-3),
    "box_taps": Option(None, (list, None), help="modules for the box L2 without an RPN"),
}
