"""The ``METHODS`` registry: a method is an importance callable plus how it is applied.

To add a method, write an importance factory ``fn(ctx) -> torch-pruning Importance``
(a callable that scores the channels of a coupled group; cite the paper in its
docstring) and add one :class:`~detprune.pruning.base.Method` entry to ``METHODS``.
Families of methods live in their own modules and are merged here, followed by the
from-scratch control ``scratch-<m>`` of every method that prunes (:func:`scratch_controls`).
"""

from __future__ import annotations

from detprune.config import SCRATCH_PREFIX
from detprune.pruning.base import Method
from detprune.pruning.importance.dcp import DCP_METHODS
from detprune.pruning.importance.gcp import GCP_METHODS
from detprune.pruning.importance.magnitude import (
    bn_scale_importance,
    fpgm_importance,
    group_l2_importance,
    l1_importance,
    random_importance,
)
from detprune.pruning.importance.miep import MIEP_METHODS
from detprune.pruning.importance.taylor import taylor_importance
from detprune.pruning.scratch import from_scratch

BASELINES: dict[str, Method] = {
    "random": Method("random channels (seeded)", random_importance),
    "uniform": Method(
        "uniform width: every layer keeps the same share (Slimmable stand-in)",
        l1_importance,
        global_pruning=False,
    ),
    "l1": Method("group L1 magnitude (Li et al. 2017, DepGraph grouping)", l1_importance),
    "depgraph": Method(
        "DepGraph: group sparse training, then group L2 norm (Fang et al. 2023)",
        group_l2_importance,
        sparsity="group_l2",
    ),
    "slim": Method(
        "Network Slimming: L1 on BN scales, then |gamma| (Liu et al. 2017)",
        bn_scale_importance,
        sparsity="bn_l1",
    ),
    "fpgm": Method(
        "FPGM: geometric-median redundancy, the same ratio per layer (He et al. 2019)",
        fpgm_importance,
        global_pruning=False,
    ),
    "taylor": Method(
        "first-order Taylor of the task loss (Molchanov et al. 2019)",
        taylor_importance,
        needs_gradients=True,
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
            procedure=from_scratch,
            family="control",
            scratch_of=name,
        )
        for name in methods
    }


METHODS: dict[str, Method] = {**PRUNING_METHODS, **scratch_controls(PRUNING_METHODS)}


def get_method(name: str) -> Method:
    """Look up a method; unknown names get a clear error."""
    if name not in METHODS:
        raise KeyError(f"prune.methods: unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]
