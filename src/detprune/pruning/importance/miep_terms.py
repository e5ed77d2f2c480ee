"""MIEP's importance terms over one pruning step: their totals, FOI's matched scale and
how far IRI's discount follows magnitude.

``I = (I_TLI + I_FOI) * I_IRI`` adds two Fisher terms of different losses, and I_FOI is
identically 0 for every group its mask gradient cannot reach (layers after the neck
taps: the RPN conv, the box head), so the sum shifts pruning towards those layers by the
ratio of the two totals; the paper neither reports nor controls it. :func:`term_totals`
gives the totals the pruning report logs per step, :func:`matched_foi_scale` the factor
of the ``foi_scale: matched`` ablation (I_FOI's total made equal to I_TLI's over the
groups FOI reaches), :func:`iri_overlap` the share of IRI-discounted channels that are
also their layer's lowest-L1 ones.

MIEP: "Channel Pruning with Multi-granular Importance Estimation for Object Detection",
ACM MM 2023 (doi 10.1145/3581783.3612563); TLI is GroupFisher's mask Fisher (Liu et al.,
"Group Fisher Pruning for Practical Network Compression", ICML 2021).
"""

from __future__ import annotations

from typing import Any

from detprune.pruning.importance.fisher import ProgressiveImportance
from detprune.pruning.importance.iri import lowest_l1_overlap


def term_totals(imp: ProgressiveImportance) -> dict[str, float]:
    """Sums over every channel of every group of I_TLI and of I_FOI (before
    ``foi_scale``), I_TLI's sum over the groups FOI reaches (I_FOI not identically 0) and
    how many groups those are. Absent terms count 0."""
    tli = foi = tli_reached = 0.0
    reached = 0
    for name in imp.groups:
        parts = imp.components(name)
        t = float(parts["tli"].sum()) if "tli" in parts else 0.0
        f = float(parts["foi"].sum()) if "foi" in parts else 0.0
        tli, foi = tli + t, foi + f
        if f > 0:
            tli_reached += t
            reached += 1
    return {
        "tli_total": tli,
        "foi_total": foi,
        "tli_total_foi_groups": tli_reached,
        "foi_groups": reached,
    }


def matched_foi_scale(totals: dict[str, float]) -> float:
    """The factor that makes I_FOI's total equal to I_TLI's over the groups FOI reaches
    (1 when FOI is 0 everywhere)."""
    if totals["foi_total"] <= 0:
        return 1.0
    return totals["tli_total_foi_groups"] / totals["foi_total"]


def iri_overlap(imp: ProgressiveImportance, lambda_scale: float) -> dict[str, Any]:
    """Over all groups: how many channels IRI discounts, and the share of them that are
    among their layer's lowest-L1 channels (the same count per group; ``None`` when IRI
    discounts none)."""
    discounted = overlap = 0
    for name, info in imp.groups.items():
        iri = imp.components(name).get("iri")
        if iri is None:
            continue
        k, hit = lowest_l1_overlap(info, iri, lambda_scale)
        discounted, overlap = discounted + k, overlap + hit
    share = overlap / discounted if discounted else None
    return {"iri_discounted": discounted, "iri_lowest_l1_share": share}
