"""GroupFisher (progressive) and MIEP, with MIEP's ablations, as registry methods.

Every entry runs :func:`detprune.pruning.progressive.procedure` with preset options;
``prune.options.<name>.<key>`` overrides them (keys: ``progressive.DEFAULTS``).

- GroupFisher: Liu et al., "Group Fisher Pruning for Practical Network Compression",
  ICML 2021 (mask Fisher of the task loss over coupled groups, FLOPs-normalised).
- MIEP: "Channel Pruning with Multi-granular Importance Estimation for Object
  Detection", ACM MM 2023: ``I = (I_TLI + I_FOI) * I_IRI``, L_info also trained.
"""

from __future__ import annotations

from typing import Any

from detprune.pruning.base import Method
from detprune.pruning.progressive import ProgressiveMethod, procedure

_MIEP: dict[str, Any] = {"tli": True, "foi": True, "iri": True}


def _variant(description: str, family: str, **preset: Any) -> ProgressiveMethod:
    return ProgressiveMethod(
        description, None, procedure, distill=None, family=family, preset=preset
    )


MIEP_METHODS: dict[str, Method] = {
    "groupfisher": _variant(
        "GroupFisher: progressive, FLOPs-normalised mask Fisher over coupled groups "
        "(Liu et al. 2021)",
        "groupfisher",
        tli=True,
        foi=False,
        iri=False,
    ),
    "miep": _variant(
        "MIEP: (TLI + FOI) * IRI, progressive, L_info trained (MIEP, ACM MM 2023)", "miep", **_MIEP
    ),
    "miep-tli": _variant(
        "MIEP ablation: TLI only (GroupFisher's criterion and procedure)",
        "miep",
        tli=True,
        foi=False,
        iri=False,
    ),
    "miep-tli-foi": _variant(
        "MIEP ablation: TLI + FOI (no IRI)", "miep", tli=True, foi=True, iri=False
    ),
    "miep-tli-iri": _variant(
        "MIEP ablation: TLI * IRI (no FOI)", "miep", tli=True, foi=False, iri=True
    ),
    "miep-phipre": _variant(
        "MIEP ablation: TLI + FOI with Phi_pre only (no Phi_obj weighting, no IRI)",
        "miep",
        tli=True,
        foi=True,
        foi_objectness=False,
        iri=False,
    ),
    "miep-foi-pruneonly": _variant(
        "MIEP ablation: TLI + FOI, L_info for pruning only (not trained; no IRI)",
        "miep",
        tli=True,
        foi=True,
        foi_optimize=False,
        iri=False,
    ),
    "miep-mse": _variant(
        "MIEP ablation: TLI + FOI with MSE instead of cosine (no IRI)",
        "miep",
        tli=True,
        foi=True,
        foi_similarity="mse",
        iri=False,
    ),
    "miep-kmeans": _variant(
        "MIEP ablation: IRI with k-means instead of hierarchical clustering",
        "miep",
        **_MIEP,
        iri_algorithm="kmeans",
    ),
    "miep-distance": _variant(
        "MIEP ablation: IRI clustering stopped at distance 0.8 instead of ratio 0.1",
        "miep",
        **_MIEP,
        iri_stop="distance",
    ),
}
