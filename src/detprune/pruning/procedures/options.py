"""The options of each pruning procedure, with defaults and types (no torch).

``prune.options.<method>`` may set the keys its procedure declares here; the registry
(:mod:`detprune.pruning.methods`) attaches them to each entry and the config check
refuses any other key, or a value of the wrong type, when the config loads. The
procedures start from :func:`~detprune.utils.options.defaults` of these declarations.
"""

from __future__ import annotations

from detprune.utils.options import Option

#: The allocation settings of the ``prune`` section, which ``prune.options.<method>``
#: may set for one method; every procedure accepts them.
SHARED: dict[str, Option] = {
    "global_pruning": Option(True, help="rank channels over the whole network"),
    "max_layer_ratio": Option(0.9, help="no layer loses more than this share"),
    "round_to": Option(None, (int, None), help="keep channel counts multiples of this"),
    "tolerance": Option(0.02, help="kept FLOPs within this (relative) of the target"),
    "calib_batches": Option(8, help="batches for data-dependent criteria"),
}

#: One shot to the FLOPs target (:mod:`detprune.pruning.procedures.oneshot`).
ONESHOT: dict[str, Option] = dict(SHARED)

#: Progressive pruning, GroupFisher and MIEP (:mod:`detprune.pruning.procedures.progressive`).
PROGRESSIVE: dict[str, Option] = {
    **SHARED,
    "interval": Option(5, help="training iterations between two pruning steps"),
    "steps": Option(20, help="planned pruning steps to the target (~1/steps of what is left)"),
    "channels_per_step": Option(
        None, (int, None), help="a fixed channel count per step instead (shrunk near the end)"
    ),
    "max_steps": Option(200),
    "lr_scale": Option(0.2, help="pruning-stage lr = train lr * lr_scale"),
    # gradient-norm clipping of the pruning-stage steps (mmdetection's max_norm for its
    # one-stage detectors); null: none. Without it miep-mse diverged on GFL at 10 % FLOPs
    # (L_info 1.8 -> 18003 -> 2e29 in 15 iterations after the neck was pruned).
    "clip_grad_norm": Option(35.0, (float, None)),
    "normalize_flops": Option(
        True, help="divide a group's importance by the MACs of one of its channels"
    ),
    "coupling": Option("shared_mask", help='coupled layers share one mask | "sum" of per-layer'),
    "tli": Option(True),
    "foi": Option(False),
    "iri": Option(False),
    "foi_optimize": Option(True, help="also add L_info to the training loss (else: pruning only)"),
    "foi_weight": Option(1.0),
    "foi_similarity": Option("cosine", help='"cosine" | "mse"'),
    "foi_objectness": Option(True, help="Phi_obj weighting (False: Phi_pre only)"),
    "foi_guide_bn": Option(
        "batch", help='guide BN uses the batch statistics like the student | "eval"'
    ),
    "foi_scale": Option(
        "raw",
        help='"raw": I_TLI + I_FOI as the paper | "matched": I_FOI rescaled per step so its '
        "total equals I_TLI's over the groups FOI reaches (ablation)",
    ),
    "foi_adapter": Option(
        "prune",
        help='"prune": a pruned neck channel takes its input column of the 1x1 adapters with '
        'it, the rest keep their trained weights | "refit": least-squares refit (old)',
    ),
    "iri_algorithm": Option("hierarchical", help='"hierarchical" | "kmeans"'),
    "iri_stop": Option("ratio", help='"ratio" | "distance"'),
    "iri_ratio": Option(0.1),
    "iri_distance": Option(0.8),
    "iri_linkage": Option("ward"),
    "iri_lambda": Option(2.0),
    # chosen on val (benchmarks/method_fidelity.md): miep-tli-iri at 10 % FLOPs, one global
    # scale 33.4 val AP, unit-norm descriptors 31.0 (-2.5 [-4.2, -0.4]); the paper is silent
    "iri_normalize": Option(
        False,
        help="unit L2 norm per channel descriptor before clustering (false: one global "
        "scale, on which a layer's low-norm channels merge somewhat more often)",
    ),
}

#: The auxiliary heads and default boxes of DCP/LCP, shared by the stage-wise procedure
#: and LCP's fine-tuning loss.
AUX_HEAD: dict[str, Option] = {
    "m": Option("iou", (str, float), help="LCP's GIoU weight: IoU(B, A), or a number"),
    "aux_channels": Option(64),
    "roi_size": Option(3),
    "anchor_scales": Option([2.0, 4.0, 8.0]),
    "anchor_ratios": Option([0.5, 1.0, 2.0]),
    "max_pos": Option(32, help="positive default boxes sampled per image"),
    "neg_ratio": Option(3.0, help="negatives per positive (random, not hard-mined)"),
}

#: Stage-wise DCP/LCP (:mod:`detprune.pruning.procedures.stagewise`).
STAGEWISE: dict[str, Option] = {
    **SHARED,
    "mse_weight": Option(1.0, help="DCP's code: weight of the reconstruction error"),
    "alpha": Option(1.0, help="DCP's code: weight of the auxiliary loss"),
    "num_aux_losses": Option(
        3, help="DCP's code: auxiliary losses (the last stage uses the task loss)"
    ),
    "layer_lr": Option(0.01, help="DCP's code: lr of the layer-wise SGD on the selected weights"),
    "m": AUX_HEAD["m"],
    "allocation": Option("l1", help="METHODS entry whose FLOPs allocation gives the budgets"),
    # the selection budget (the CPU defaults; DCP itself scores every greedy step on the
    # whole loader and adds one channel per step: batches large, channels_per_round 1)
    "batches": Option(2, help="calibration batches for the selection (held in memory)"),
    # chosen on val (benchmarks/method_fidelity.md): dcp at 10 % FLOPs, 4 rounds 19.0 val AP,
    # 16 rounds 23.2 (+4.2 [2.2, 6.4]), 32 rounds 23.5, one channel per round 23.4 at 2.6x
    # the 16 rounds' pruning time; 8 calibration batches instead of 2: 17.8
    "select_steps": Option(16, help="greedy rounds per group (>= budget: one channel per round)"),
    "channels_per_round": Option(
        None,
        (int, None),
        help="channels added per greedy round (1: DCP's); null: ceil(budget / select_steps)",
    ),
    "sgd_iters": Option(2, help="SGD steps on the selected weights after each round"),
    # chosen on val (benchmarks/method_fidelity.md): dcp at 10 % FLOPs, raw sum 19.0 val AP,
    # energy-weighted 15.8 (-3.2 [-5.2, -1.4]), divided by the energy alone 12.5; with the
    # raw sum every consumer still ends below relative error 1 (median 0.59)
    "recon_normalize": Option(
        False,
        help="weight each consumer's reconstruction error by mean energy / its unpruned "
        "output energy (mean Y^2 over the calibration batches); false: the raw sum",
    ),
    "aux_batches": Option(4, help="batches the auxiliary heads are trained on"),
    "aux_iters": Option(60, help="SGD steps training each stage's auxiliary head first"),
    "aux_lr": Option(0.05),
    **{k: v for k, v in AUX_HEAD.items() if k != "m"},
}

#: Group channel pruning (:mod:`detprune.pruning.procedures.gcp`).
GCP: dict[str, Option] = {
    **SHARED,
    "fractions": Option(None, (dict, None), help="{group: fraction}, over the defaults"),
    # how the FLOPs target scales the fractions (procedures/gcp_alloc.py): "capped" keeps
    # every group at most max_layer_ratio and spreads the rest over the groups below it;
    # "saturating" lets groups reach 1 (the earlier rule: 0.0 mAP at 10 % FLOPs)
    "allocation": Option("capped", help='"capped" (at max_layer_ratio) | "saturating" (at 1)'),
    "min_channels": Option(
        None,
        (int, None),
        help="the authors' per-layer floor max(1% of C, this); max_layer_ratio's applies too",
    ),
    "fold_beta": Option(True, help="fold removed BN channels' beta into the next layer"),
    "max_trials": Option(30, help="bisection steps of the fraction scale"),
}

#: The from-scratch control (:mod:`detprune.pruning.procedures.scratch`).
SCRATCH: dict[str, Option] = dict(SHARED)

#: LCP's loss during fine-tuning (``finetune.methods.<m>.distill_options`` of ``lcp``,
#: :mod:`detprune.pruning.lcp_loss`).
LCP_LOSS: dict[str, Option] = {
    "weight": Option(1.0, help="weight of L_a"),
    "lr": Option(0.01),
    "momentum": Option(0.9),
    "weight_decay": Option(1e-4),
    "seed": Option(0),
    "reuse_head": Option(
        True,
        help="start from the auxiliary head the pruning trained on this feature (the "
        "checkpoint's aux_heads) when its shapes fit; false or missing: a fresh head",
    ),
    "feature": Option(
        None,
        (str, None),
        help="aux_features module the head reads; null: the deepest one with a head in the "
        "checkpoint, else the deepest aux_features entry",
    ),
    **AUX_HEAD,
}
