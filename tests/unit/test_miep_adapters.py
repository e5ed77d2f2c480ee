"""FOI's 1x1 adapters follow the pruned neck through torch-pruning's dependency graph
(issue 21): they lose the pruned channels' input columns and keep their trained weights,
and the pruning history, which never names them, replays on the bare model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp

from detprune.pruning.importance.fisher import prunable_groups
from detprune.pruning.importance.foi import FeatureRecorder, InfoLoss
from detprune.pruning.importance.iri import channel_descriptors
from detprune.pruning.procedures.miep import (
    ADAPTERS,
    FOIState,
    adapter_modules,
    dependency_graph,
)
from detprune.train import checkpoint
from tests.unit.test_miep import Toy

EXAMPLE = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))


class DenseToy(Toy):
    """The toy detector whose tensor forward (the one traced) also runs its head, as the
    registry detectors return their dense head outputs: the neck feeds the head and,
    traced with them, FOI's adapters."""

    def forward(self, images, targets=None):
        out = super().forward(images, targets)
        if targets is not None:
            return out
        neck, logits = out
        return self.head(neck), logits


def trained_state(adapter: str = "prune") -> tuple[DenseToy, FOIState]:
    """The toy detector, its FOI state, and adapters with "trained" (random) weights."""
    torch.manual_seed(0)
    student = DenseToy()
    guide = copy.deepcopy(student).requires_grad_(False)
    foi = FOIState(
        FeatureRecorder(student, ["neck"], ["cls"]),
        FeatureRecorder(guide, ["neck"], ["cls"]),
        InfoLoss("cosine", adapter=adapter),
        True,
        1.0,
    )
    foi.loss.setup([torch.zeros(1, 3, 1, 1)], [torch.zeros(1, 3, 1, 1)])
    with torch.no_grad():
        for p in foi.loss.parameters():
            p.copy_(torch.randn_like(p))
    return student, foi


def test_a_pruned_neck_channel_takes_its_adapter_columns_and_the_rest_stay():
    student, foi = trained_state()
    (adapter,) = foi.loss.adapters
    weight, bias = adapter.weight.detach().clone(), adapter.bias.detach().clone()
    dg = dependency_graph(student, EXAMPLE, foi)
    assert not hasattr(student, ADAPTERS)  # attached only while traced
    groups = prunable_groups(dg, student, ["cls", "head"], adapter_modules(foi))
    assert sorted(g.root_name for g in groups) == ["body", "neck"]  # no adapter root
    (neck,) = [g for g in groups if g.root_name == "neck"]
    # IRI describes the detector's layers only: neck filters (2) + head slices (1)
    assert channel_descriptors(dg, neck, adapter_modules(foi)).shape == (3, 3)
    assert channel_descriptors(dg, neck).shape == (3, 6)  # the adapter's 3 would count
    dg.get_pruning_group(neck.root_module, neck.pruning_fn, [1]).prune()
    assert (adapter.in_channels, adapter.out_channels) == (2, 3)
    assert torch.equal(adapter.weight, weight[:, [0, 2]])  # exactly the trained weights
    assert torch.equal(adapter.bias, bias)
    assert student.head.in_channels == 2
    # L_info runs on the pruned neck with the pruned adapters (no refit, no error)
    with torch.no_grad(), foi.student.record():
        student(EXAMPLE)
    guide_feats = [torch.rand(1, 3, 6, 6)]
    assert torch.isfinite(foi.loss(foi.student.feats, guide_feats, [None]))


def test_the_history_names_only_the_model_and_replays_on_the_bare_model():
    student, foi = trained_state()
    dg = dependency_graph(student, EXAMPLE, foi)
    groups = prunable_groups(dg, student, ["cls", "head"], adapter_modules(foi))
    groups = {g.root_name: g for g in groups}
    dg.get_pruning_group(groups["neck"].root_module, groups["neck"].pruning_fn, [0]).prune()
    body = dg.get_pruning_group(groups["body"].root_module, groups["body"].pruning_fn, [1])
    body.prune()
    history = dg.pruning_history()
    assert history == [["neck", True, [0]], ["body", True, [1]]]
    bare = DenseToy()
    tp.DependencyGraph().build_dependency(bare, example_inputs=(EXAMPLE,)).load_pruning_history(
        history
    )
    assert bare.state_dict().keys() == student.state_dict().keys()  # no adapter in it
    assert {k: v.shape for k, v in bare.state_dict().items()} == {
        k: v.shape for k, v in student.state_dict().items()
    }
    # the adapters of a fresh FOI state, traced with the bare model, replay the same way
    again, fresh = trained_state()
    dependency_graph(again, EXAMPLE, fresh).load_pruning_history(history)
    assert fresh.loss.adapters[0].in_channels == foi.loss.adapters[0].in_channels == 2
    assert again.neck.out_channels == 2


def test_refit_mode_leaves_the_adapters_out_of_the_graph_and_refits_them():
    student, foi = trained_state("refit")
    assert adapter_modules(foi) == []
    dg = dependency_graph(student, EXAMPLE, foi)
    (neck,) = [g for g in prunable_groups(dg, student, ["cls", "head"]) if g.root_name == "neck"]
    dg.get_pruning_group(neck.root_module, neck.pruning_fn, [1]).prune()
    assert foi.loss.adapters[0].in_channels == 3  # stale until L_info runs
    with torch.no_grad(), foi.student.record():
        student(EXAMPLE)
    foi.loss(foi.student.feats, [torch.rand(1, 3, 6, 6)], [None])
    assert foi.loss.adapters[0].in_channels == 2  # refitted by least squares


def test_prune_mode_refuses_adapters_that_missed_the_pruning():
    student, foi = trained_state()
    with pytest.raises(RuntimeError, match="pruned with the neck"):
        foi.loss([torch.rand(1, 2, 6, 6)], [torch.rand(1, 3, 6, 6)], [None])
    with pytest.raises(ValueError, match="foi_adapter"):
        InfoLoss("cosine", adapter="copy")


def test_a_history_naming_a_module_outside_the_model_is_refused_on_replay():
    with pytest.raises(ValueError, match=r"lacks: \['_foi_adapters.0'\]"):
        checkpoint.apply_history(DenseToy(), {}, [["_foi_adapters.0", False, [1]]])
