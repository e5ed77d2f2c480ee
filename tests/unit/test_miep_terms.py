"""MIEP's importance terms per pruning step (issue 21): I_TLI's and I_FOI's totals, FOI's
matched scale, IRI's overlap with the lowest-L1 channels, as the step log records them."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from detprune.pruning.importance.fisher import (
    GroupInfo,
    MaskFisher,
    ProgressiveImportance,
    prunable_groups,
)
from detprune.pruning.importance.iri import IRIConfig, iri_scores
from detprune.pruning.importance.miep_terms import iri_overlap, term_totals
from detprune.pruning.procedures.miep import step_terms
from tests.unit.test_miep_iri import group_of, mixed_norm_net


def fisher_terms() -> tuple[nn.Sequential, tp.DependencyGraph, list, MaskFisher]:
    """The chain conv -> BN -> ReLU -> conv, its one group, and a mask Fisher of two losses:
    ``tli`` (mean square of the output) and ``foi`` (of its first output channel only)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)
    )
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    net.eval()
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=x[:1])
    groups = prunable_groups(dg, net, ["3"])
    fisher = MaskFisher(net, groups)
    net.train()
    for key, loss in (("tli", lambda y: y.pow(2).mean()), ("foi", lambda y: y[:, 0].mean())):
        with fisher.masks(len(x)):
            out = loss(net(x))
        out.backward()
        fisher.collect(key)
    return net, dg, groups, fisher


def test_term_totals_and_matched_foi_scale_make_the_totals_equal():
    _, dg, groups, fisher = fisher_terms()
    tli, foi = fisher.scores("tli", "0", 6), fisher.scores("foi", "0", 6)
    for mode, scale in (("raw", 1.0), ("matched", float(tli.sum() / foi.sum()))):
        imp = ProgressiveImportance(fisher, dg, groups, foi=True)
        terms = step_terms(imp, {"foi_scale": mode}, None)
        assert terms["tli_total"] == pytest.approx(float(tli.sum()))
        assert terms["foi_total"] == pytest.approx(float(foi.sum()))  # before the scale
        assert terms["foi_groups"] == 1
        assert terms["foi_scale"] == pytest.approx(scale) and imp.foi_scale == terms["foi_scale"]
        assert terms["foi_tli_ratio"] == pytest.approx(scale * float(foi.sum() / tli.sum()))
        # what the scores sum: I_TLI + scale * I_FOI
        torch.testing.assert_close(imp(groups[0].group), tli + scale * foi)
        if mode == "matched":
            assert terms["foi_tli_ratio"] == pytest.approx(1.0)
            assert scale * terms["foi_total"] == pytest.approx(terms["tli_total_foi_groups"])


def test_matched_scale_counts_only_the_groups_foi_reaches():
    a, b = GroupInfo(None, "a", 2), GroupInfo(None, "b", 2)
    fisher = MaskFisher(None, [a, b])
    fisher.fisher = {
        "tli": {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([2.0, 2.0])},
        "foi": {"a": torch.tensor([0.5, 0.5]), "b": torch.zeros(2)},  # b: after the neck
    }
    fisher.samples = {"tli": 1, "foi": 1}
    imp = ProgressiveImportance(fisher, None, [a, b], foi=True)
    assert term_totals(imp) == {
        "tli_total": 8.0,
        "foi_total": 1.0,
        "tli_total_foi_groups": 4.0,
        "foi_groups": 1,
    }
    terms = step_terms(imp, {"foi_scale": "matched"}, None)
    assert terms["foi_scale"] == pytest.approx(4.0)  # FOI's total 4 = TLI's over group a
    assert terms["foi_tli_ratio"] == pytest.approx(0.5)  # of TLI's total over both groups
    assert step_terms(imp, {"foi_scale": "raw"}, None)["foi_tli_ratio"] == 1 / 8


def test_iri_overlap_pools_the_groups():
    dg, info = group_of(mixed_norm_net())
    fisher = MaskFisher(None, [info])
    for normalize, share in ((True, 0.0), (False, 1.0)):
        cfg = IRIConfig(normalize=normalize)
        imp = ProgressiveImportance(
            fisher, dg, [info], iri=lambda g, cfg=cfg: iri_scores(dg, g, cfg)
        )
        assert iri_overlap(imp, 2.0) == {"iri_discounted": 2, "iri_lowest_l1_share": share}
        terms = step_terms(imp, {"foi_scale": "raw"}, cfg)
        assert terms["iri_lowest_l1_share"] == share and "foi_total" not in terms
