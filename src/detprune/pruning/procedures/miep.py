"""MIEP's parts of the progressive procedure: L_info's state, the dependency graph that
prunes FOI's adapters with the neck, and the per-step log of the importance terms.

FOI compares the neck features of the student, through one learned 1x1 adapter per
level, with those of the unpruned guide. The adapters consume the neck like any layer
of the detector: :func:`dependency_graph` traces them into torch-pruning's graph, so a
pruned neck channel takes the matching input column of every adapter with it and the
surviving columns keep their trained weights (``foi_adapter: prune``). They are attached
to the model only while it is traced: the model's parameters, its ``state_dict`` and the
pruning history (whose roots are always the model's layers) never name them, and a
checkpoint's history replays on the bare model (:func:`detprune.train.checkpoint.load_model`).
The adapters live only in the pruning stage; no checkpoint stores them.

MIEP: "Channel Pruning with Multi-granular Importance Estimation for Object Detection",
ACM MM 2023 (doi 10.1145/3581783.3612563).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from detprune.pruning.base import PruneContext
from detprune.pruning.importance.fisher import ProgressiveImportance
from detprune.pruning.importance.foi import FeatureRecorder, InfoLoss, run_guide
from detprune.pruning.importance.iri import IRIConfig
from detprune.pruning.importance.miep_terms import iri_overlap, matched_foi_scale, term_totals

#: The attribute FOI's adapters are attached under while the model is traced; the
#: dependency graph names them ``_foi_adapters.<level>``.
ADAPTERS = "_foi_adapters"


@dataclass
class FOIState:
    """What L_info needs during the pruning stage."""

    student: FeatureRecorder
    guide: FeatureRecorder
    loss: InfoLoss
    optimize: bool
    weight: float
    guide_batch_stats: bool = True


def on_device(example: Any, device: torch.device) -> Any:
    """The tracing example (a tensor or a list of them) on ``device``."""
    if torch.is_tensor(example):
        return example.to(device)
    return [x.to(device) for x in example]


@torch.no_grad()
def example_features(
    foi: FOIState, model: nn.Module, example: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Neck features of the student and of the guide on the tracing example (eval mode)."""
    was = model.training
    model.eval()
    with foi.student.record():
        model(example)
    model.train(was)
    feats, _ = run_guide(foi.guide, example, None)
    return foi.student.feats, feats


def make_foi(ctx: PruneContext, model: nn.Module, guide: nn.Module, opts: dict) -> FOIState:
    """L_info's recorders, loss and adapters (set up at the unpruned widths)."""
    if not ctx.entry.neck_outputs:
        raise ValueError(f"{ctx.spec.get('name')}: FOI needs the entry's neck_outputs")
    if opts["foi_guide_bn"] not in ("batch", "eval"):
        raise ValueError(f"foi_guide_bn must be batch or eval, got {opts['foi_guide_bn']!r}")
    if opts["foi_scale"] not in ("raw", "matched"):
        raise ValueError(f"foi_scale must be raw or matched, got {opts['foi_scale']!r}")
    guide = guide.to(ctx.device).eval().requires_grad_(False)
    foi = FOIState(
        FeatureRecorder(model, ctx.entry.neck_outputs, ctx.entry.cls_logits),
        FeatureRecorder(guide, ctx.entry.neck_outputs, ctx.entry.cls_logits),
        InfoLoss(opts["foi_similarity"], bool(opts["foi_objectness"]), opts["foi_adapter"]),
        bool(opts["foi_optimize"]),
        float(opts["foi_weight"]),
        opts["foi_guide_bn"] == "batch",
    )
    foi.loss.setup(*example_features(foi, model, on_device(ctx.example, ctx.device)))
    return foi


def adapter_modules(foi: FOIState | None) -> list[nn.Module]:
    """The adapters the dependency graph prunes (none unless ``foi_adapter: prune``)."""
    if foi is None or foi.loss.adapter != "prune":
        return []
    return list(foi.loss.adapters)


def dependency_graph(model: nn.Module, example: Any, foi: FOIState | None) -> tp.DependencyGraph:
    """torch-pruning's graph of ``model`` traced on ``example``; with ``foi_adapter:
    prune`` FOI's adapters are traced too, as consumers of the neck features."""
    adapters = adapter_modules(foi)
    if not adapters:
        return tp.DependencyGraph().build_dependency(model, example_inputs=(example,))

    def forward(m: nn.Module, inputs: tuple) -> list:
        with foi.student.record():
            out = m(*inputs)
        return [out, [a(f) for a, f in zip(adapters, foi.student.feats, strict=True)]]

    model.add_module(ADAPTERS, foi.loss.adapters)
    try:
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=(example,), forward_fn=forward
        )
    finally:
        delattr(model, ADAPTERS)


def step_terms(
    imp: ProgressiveImportance, opts: Mapping[str, Any], iri: IRIConfig | None
) -> dict[str, Any]:
    """The importance terms of one pruning step for its log: I_TLI's and I_FOI's totals,
    the factor I_FOI enters the sum with (1, or ``matched``'s, then set on ``imp``) and
    the ratio of the two totals as summed; with IRI, the channels it discounts and their
    overlap with the lowest-L1 ones. Call before ``imp`` scores anything."""
    totals = term_totals(imp)
    out: dict[str, Any] = {"tli_total": totals["tli_total"]}
    if imp.foi:
        scale = matched_foi_scale(totals) if opts["foi_scale"] == "matched" else 1.0
        imp.foi_scale = scale
        tli = totals["tli_total"]
        out.update(totals, foi_scale=scale)
        out["foi_tli_ratio"] = scale * totals["foi_total"] / tli if tli > 0 else None
    if iri is not None:
        out.update(iri_overlap(imp, iri.lambda_scale))
    return out


def loss_ratio(mean: Mapping[str, float]) -> dict[str, Any]:
    """``info_task_ratio``: the step's mean (weighted) L_info over its mean task loss (the
    weight ``foi_weight`` is not published; this lets it be compared)."""
    if "info" not in mean:
        return {}
    return {"info_task_ratio": mean["info"] / mean["loss"] if mean["loss"] else None}
