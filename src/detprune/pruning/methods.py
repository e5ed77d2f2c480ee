"""The ``METHODS`` registry: a method is an importance callable plus how it is applied.

To add a method, write an importance factory ``fn(ctx) -> torch-pruning Importance``
(a callable that scores the channels of a coupled group; cite the paper in its
docstring) and add one :class:`~detprune.pruning.base.Method` entry to ``METHODS``.
Every family of methods has its table here (baselines, GroupFisher/MIEP with MIEP's
ablations, DCP/LCP, GCP), followed by the from-scratch control ``scratch-<m>`` of every
method that prunes (:func:`scratch_controls`).

The entries name their importance and procedure as ``"package.module:function"``
references, imported when first called, and declare the options
``prune.options.<name>`` accepts (:mod:`detprune.pruning.procedures.options`): the
workflow and the config check read this registry without importing torch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from detprune.pruning.base import SCRATCH_PREFIX, Method, resolve
from detprune.pruning.procedures.options import GCP, ONESHOT, PROGRESSIVE, SCRATCH, STAGEWISE
from detprune.utils.options import Option

if TYPE_CHECKING:
    from detprune.pruning.base import Procedure, PruneContext, PruneResult

ONESHOT_PROCEDURE = "detprune.pruning.procedures.oneshot:oneshot"


def _oneshot(description: str, importance: str, **fields: Any) -> Method:
    return Method(
        description,
        importance,
        procedure=ONESHOT_PROCEDURE,
        options=ONESHOT,
        **fields,
    )


BASELINES: dict[str, Method] = {
    "random": _oneshot(
        "random channels (seeded)", "detprune.pruning.importance.magnitude:random_importance"
    ),
    "uniform": _oneshot(
        "uniform width: every layer keeps the same share (Slimmable stand-in)",
        "detprune.pruning.importance.magnitude:l1_importance",
        global_pruning=False,
    ),
    "l1": _oneshot(
        "group L1 magnitude (Li et al. 2017, DepGraph grouping)",
        "detprune.pruning.importance.magnitude:l1_importance",
    ),
    "depgraph": _oneshot(
        "DepGraph: group sparse training, then group L2 norm (Fang et al. 2023)",
        "detprune.pruning.importance.magnitude:group_l2_importance",
        sparsity="group_l2",
    ),
    "slim": _oneshot(
        "Network Slimming: L1 on BN scales, then |gamma| (Liu et al. 2017)",
        "detprune.pruning.importance.magnitude:bn_scale_importance",
        sparsity="bn_l1",
    ),
    "fpgm": _oneshot(
        "FPGM: geometric-median redundancy, the same ratio per layer (He et al. 2019)",
        "detprune.pruning.importance.magnitude:fpgm_importance",
        global_pruning=False,
    ),
    "taylor": _oneshot(
        "first-order Taylor of the task loss (Molchanov et al. 2019)",
        "detprune.pruning.importance.taylor:taylor_importance",
        needs_gradients=True,
    ),
}


# GroupFisher (progressive) and MIEP, with MIEP's ablations: every entry runs the
# progressive procedure with preset options; ``prune.options.<name>.<key>`` overrides them.
# - GroupFisher: Liu et al., "Group Fisher Pruning for Practical Network Compression",
#   ICML 2021 (mask Fisher of the task loss over coupled groups, FLOPs-normalised).
# - MIEP: "Channel Pruning with Multi-granular Importance Estimation for Object
#   Detection", ACM MM 2023: ``I = (I_TLI + I_FOI) * I_IRI``, L_info also trained.
_MIEP: dict[str, Any] = {"tli": True, "foi": True, "iri": True}


def _progressive(description: str, family: str, **preset: Any) -> Method:
    return Method(
        description,
        None,
        "detprune.pruning.procedures.progressive:procedure",
        distill=None,
        family=family,
        options=PROGRESSIVE,
        preset=preset,
    )


MIEP_METHODS: dict[str, Method] = {
    "groupfisher": _progressive(
        "GroupFisher: progressive, FLOPs-normalised mask Fisher over coupled groups "
        "(Liu et al. 2021)",
        "groupfisher",
        tli=True,
        foi=False,
        iri=False,
    ),
    "miep": _progressive(
        "MIEP: (TLI + FOI) * IRI, progressive, L_info trained (MIEP, ACM MM 2023)", "miep", **_MIEP
    ),
    "miep-tli": _progressive(
        "MIEP ablation: TLI only (GroupFisher's criterion and procedure)",
        "miep",
        tli=True,
        foi=False,
        iri=False,
    ),
    "miep-tli-foi": _progressive(
        "MIEP ablation: TLI + FOI (no IRI)", "miep", tli=True, foi=True, iri=False
    ),
    "miep-tli-iri": _progressive(
        "MIEP ablation: TLI * IRI (no FOI)", "miep", tli=True, foi=False, iri=True
    ),
    "miep-phipre": _progressive(
        "MIEP ablation: TLI + FOI with Phi_pre only (no Phi_obj weighting, no IRI)",
        "miep",
        tli=True,
        foi=True,
        foi_objectness=False,
        iri=False,
    ),
    "miep-foi-pruneonly": _progressive(
        "MIEP ablation: TLI + FOI, L_info for pruning only (not trained; no IRI)",
        "miep",
        tli=True,
        foi=True,
        foi_optimize=False,
        iri=False,
    ),
    "miep-mse": _progressive(
        "MIEP ablation: TLI + FOI with MSE instead of cosine (no IRI)",
        "miep",
        tli=True,
        foi=True,
        foi_similarity="mse",
        iri=False,
    ),
    "miep-kmeans": _progressive(
        "MIEP ablation: IRI with k-means instead of hierarchical clustering",
        "miep",
        **_MIEP,
        iri_algorithm="kmeans",
    ),
    "miep-distance": _progressive(
        "MIEP ablation: IRI clustering stopped at distance 0.8 instead of ratio 0.1",
        "miep",
        **_MIEP,
        iri_stop="distance",
    ),
}


# DCP (Zhuang et al., NeurIPS 2018) and LCP (Xie et al., Neurocomputing 2020): the
# stage-wise procedure with DCP's or LCP's auxiliary network; the channel budgets come
# from the ``allocation`` method, looked up in this registry.
def _stagewise(head: str, ctx: PruneContext, method: Method, target: float) -> PruneResult:
    from detprune.pruning.procedures.stagewise import stagewise

    return stagewise(ctx, method, target, head=head, lookup=get_method)


DCP_METHODS: dict[str, Method] = {
    "dcp": Method(
        "DCP: stage-wise discrimination-aware channel selection, classification aux net "
        "(Zhuang et al. 2018)",
        procedure=functools.partial(_stagewise, "dcp"),
        family="dcp",
        options=STAGEWISE,
    ),
    "lcp": Method(
        "LCP: DCP with a localization-aware aux net (contextual RoIAlign, GIoU), "
        "fine-tuned with its loss (Xie et al. 2020)",
        procedure=functools.partial(_stagewise, "lcp"),
        distill="lcp",
        family="dcp",
        options=STAGEWISE,
    ),
}


# GCP and GCP+SAD (Niu et al., Applied Intelligence 2022, arXiv 2306.01526). ``gcp``:
# dynamic sparse training of the BN scales (``bn_l1_dynamic``), group channel pruning to
# the FLOPs target, plain fine-tuning. ``gcp-sad``: the paper's full pipeline, the same
# plus spatial-attention distillation from the unpruned model while fine-tuning. The two
# rows differ only by SAD.
def _gcp(description: str, **fields: Any) -> Method:
    return Method(
        description,
        "detprune.pruning.importance.magnitude:gcp_importance",
        procedure="detprune.pruning.procedures.gcp:gcp_prune",
        sparsity="bn_l1_dynamic",
        family="gcp",
        options=GCP,
        **fields,
    )


GCP_METHODS: dict[str, Method] = {
    "gcp": _gcp(
        "GCP: dynamic sparse training, group channel pruning, fine-tuning (Niu et al. 2022)"
    ),
    "gcp-sad": _gcp(
        "GCP+SAD: GCP, fine-tuned with spatial-attention distillation (Niu et al. 2022)",
        distill="sad",
    ),
}

PRUNING_METHODS: dict[str, Method] = {
    **BASELINES,
    **MIEP_METHODS,
    **DCP_METHODS,
    **GCP_METHODS,
}


def scratch_controls(methods: dict[str, Method]) -> dict[str, Method]:
    """``scratch-<m>`` for every ``m`` of ``methods``: ``m``'s pruned architecture,
    randomly re-initialised and trained with the baseline's schedule (Liu et al., ICLR
    2019). Its prune stage needs ``m``'s pruned checkpoint at the same target; no sparse
    training, no distillation (``scratch-gcp-sad`` therefore trains as ``scratch-gcp``)."""
    return {
        f"{SCRATCH_PREFIX}{name}": Method(
            f"from scratch (Liu et al. 2019): {name}'s pruned widths, re-initialised, "
            "trained with the baseline's schedule",
            procedure="detprune.pruning.procedures.scratch:from_scratch",
            family="control",
            scratch_of=name,
            options=SCRATCH,
        )
        for name in methods
    }


METHODS: dict[str, Method] = {**PRUNING_METHODS, **scratch_controls(PRUNING_METHODS)}


def get_method(name: str) -> Method:
    """Look up a method; unknown names get a clear error."""
    if name not in METHODS:
        raise KeyError(f"prune.methods: unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def procedure_of(method: Method) -> Procedure:
    """The procedure that prunes with ``method``: its own, else one shot."""
    return method.procedure or resolve(ONESHOT_PROCEDURE)


def options_of(method: Method) -> Mapping[str, Option]:
    """The keys ``prune.options.<name>`` accepts for ``method``, with defaults and types
    (an entry that declares none accepts the one-shot procedure's)."""
    return method.options or ONESHOT


def sparsity_of(method: str) -> str | None:
    """The sparse-training regularizer ``method`` prunes after, if any."""
    return get_method(method).sparsity
