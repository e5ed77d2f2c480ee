"""MIEP: IRI, FOI (L_info), the combination, the ablation registry and a progressive run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from detprune.pruning.importance.fisher import MaskFisher, combine, prunable_groups
from detprune.pruning.importance.foi import (
    FeatureRecorder,
    InfoLoss,
    object_weights,
    objectness,
    run_guide,
)
from detprune.pruning.importance.iri import (
    IRIConfig,
    channel_descriptors,
    iri_from_labels,
    iri_scores,
)
from detprune.pruning.methods import METHODS
from detprune.pruning.procedures.progressive import FOIState, resolve_options, train_step
from tests.unit.progressive_run import check_progressive_run

E2 = math.exp(2.0)


# ---------------------------------------------------------------- IRI


def test_iri_of_known_clusters():
    # sizes 3, 3, 3, 1, 1 of 5 channels: C/size = 5/3 or 5 -> minmax 0 or 1 -> exp(2 * .)
    got = iri_from_labels(np.array([0, 0, 0, 1, 2]), 2.0)
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 1.0, E2, E2], dtype=torch.float64))
    # nothing merged: every channel is as unique as can be
    torch.testing.assert_close(iri_from_labels(np.arange(4), 2.0), torch.full((4,), E2).double())


def duplicated_net(copies: int) -> nn.Sequential:
    """conv(3 -> 10) -> conv(10 -> 4); channels 0..copies-1 have identical filters and
    identical consuming slices, the others are distinct."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 10, 3, bias=False), nn.Conv2d(10, 4, 1))
    with torch.no_grad():
        net[0].weight[:copies] = net[0].weight[0].clone()
        net[1].weight[:, :copies] = net[1].weight[:, :1].clone()
    return net


def iri_of(net: nn.Sequential, cfg: IRIConfig) -> torch.Tensor:
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.rand(1, 3, 6, 6))
    (group,) = prunable_groups(dg, net, ["1"])
    desc = channel_descriptors(dg, group)
    # per channel: 3 producing kernel norms (one per input channel) + 4 consuming norms
    assert desc.shape == (10, 7)
    torch.testing.assert_close(
        desc[2, :3], net[0].weight[2].detach().double().flatten(1).norm(dim=1)
    )
    torch.testing.assert_close(
        desc[2, 3:], net[1].weight[:, 2].detach().double().flatten(1).norm(dim=1)
    )
    return iri_scores(dg, group, cfg)


def test_iri_scores_a_channel_of_a_large_cluster_of_identical_filters_lower():
    # 5 identical channels, 5 merges (ratio 0.5): they form one cluster of 5, one more pair
    scores = iri_of(duplicated_net(5), IRIConfig(ratio=0.5))
    assert torch.allclose(scores[:5], torch.ones(5, dtype=torch.float64))
    assert (scores[5:] > 1).all() and scores.max() == pytest.approx(E2)
    # the paper's ratio 0.1 on 10 channels: one merge, of the two identical ones
    scores = iri_of(duplicated_net(2), IRIConfig())
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0] + [E2] * 8, dtype=torch.float64))


@pytest.mark.parametrize("cfg", [IRIConfig(algorithm="kmeans", ratio=0.5),
                                 IRIConfig(stop="distance", distance=0.05)])  # fmt: skip
def test_iri_variants_also_merge_identical_filters(cfg: IRIConfig):
    scores = iri_of(duplicated_net(5), cfg)
    assert float(scores[:5].max()) < float(scores[5:].min())


def test_iri_rejects_kmeans_with_a_distance_threshold():
    with pytest.raises(ValueError, match="hierarchical"):
        IRIConfig(algorithm="kmeans", stop="distance")


# ---------------------------------------------------------------- FOI


def test_objectness_and_phi_obj():
    logits = torch.tensor([[[[0.0]], [[2.0]]]])  # (1, 2 classes, 1, 1)
    assert float(objectness(logits)) == pytest.approx(1 / (1 + math.exp(-2)))
    feats = [torch.zeros(1, 4, 1, 1)]
    w = object_weights(feats, [torch.full((1, 1, 1, 1), -1.0)], [torch.full((1, 1, 1, 1), 3.0)])
    assert float(w[0]) == pytest.approx(1 / (1 + math.exp(-3)))  # max(O_pre, O_cur)


@torch.no_grad()
def test_info_loss_is_zero_for_the_guide_itself_and_follows_the_formula():
    torch.manual_seed(0)
    feats = [torch.randn(2, 4, 5, 5), torch.randn(2, 4, 3, 3)]
    weights = [torch.rand(2, 5, 5), torch.rand(2, 3, 3)]
    for similarity in ("cosine", "mse"):
        loss = InfoLoss(similarity)
        loss.setup(feats, feats)  # same widths: identity adapters
        assert float(loss(feats, feats, weights)) == pytest.approx(0.0, abs=1e-6)
    # guide [1, 0], student [1, 0] on the left half (weight 1) and [0, 1] on the right
    # (weight 3): cos 1 and 0, so L = 1 - (1 * 1 + 3 * 0) / (1 + 3) = 0.75
    guide = torch.zeros(1, 2, 1, 2)
    guide[:, 0] = 1
    student = guide.clone()
    student[0, :, 0, 1] = torch.tensor([0.0, 1.0])
    w = torch.tensor([[[1.0, 3.0]]])
    loss = InfoLoss("cosine")
    loss.setup([student], [guide])
    assert float(loss([student], [guide], [w])) == pytest.approx(0.75)
    assert float(InfoLoss("cosine", use_objectness=False)([student], [guide], [w])) == 0.5
    # mse: per position mean over channels of the squared difference (0 and 1) over the
    # guide's mean square (0.5): 0 and 2, so L = (1 * 0 + 3 * 2) / 4 = 1.5, at any scale
    assert float(InfoLoss("mse")([student], [guide], [w])) == pytest.approx(1.5)
    assert float(InfoLoss("mse")([100 * student], [100 * guide], [w])) == pytest.approx(1.5)


class Toy(nn.Module):
    """A one-level "detector": the image's channels 0 and 1 hold content in the object
    region and in the background respectively; channel 2 marks the objects, and the class
    logits read it (+1e4 on objects, -1e4 elsewhere: Phi_obj is exactly 1 or 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(2, 2, 1, bias=False)
        self.neck = nn.Conv2d(2, 3, 1)
        self.cls = nn.Conv2d(1, 1, 1)
        self.head = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.body.weight.copy_(torch.eye(2)[:, :, None, None])
            self.cls.weight.fill_(2e4)
            self.cls.bias.fill_(-1e4)

    def forward(self, images, targets=None):  # detector-style: losses when given targets
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        neck = self.neck(self.body(x[:, :2]))
        logits = self.cls(x[:, 2:3])
        if targets is None:
            return neck, logits
        return {"task": self.head(neck).pow(2).mean()}


def toy_images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = []
    for _ in range(2):
        obj = torch.zeros(6, 6)
        obj[1:4, 2:5] = 1
        im = torch.rand(3, 6, 6, generator=gen) + 0.5
        im[0] *= obj
        im[1] *= 1 - obj
        im[2] = obj
        images.append(im)
    return images


def toy_state(optimize: bool = True) -> tuple[Toy, MaskFisher, FOIState, list]:
    torch.manual_seed(0)
    student = Toy()
    guide = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        guide.neck.weight.add_(torch.randn_like(guide.neck.weight))  # the student departed
    images = toy_images()
    dg = tp.DependencyGraph().build_dependency(student, example_inputs=(images,))
    groups = prunable_groups(dg, student, ["neck", "cls", "head"])
    assert [g.root_name for g in groups] == ["body"]
    foi = FOIState(
        FeatureRecorder(student, ["neck"], ["cls"]),
        FeatureRecorder(guide, ["neck"], ["cls"]),
        InfoLoss("cosine"),
        optimize,
        1.0,
    )
    foi.loss.setup([torch.zeros(1, 3, 1, 1)], [torch.zeros(1, 3, 1, 1)])
    return student, MaskFisher(student, groups), foi, images


def test_foi_is_zero_for_a_channel_outside_the_objects_and_positive_inside():
    student, fisher, foi, images = toy_state()
    opt = torch.optim.SGD(list(student.parameters()) + list(foi.loss.parameters()), lr=0.0)
    out = train_step(student, (images, [{}, {}]), fisher, opt, foi)
    assert out["info"] > 0
    tli = fisher.scores("tli", "body", 2)
    i_foi = fisher.scores("foi", "body", 2)
    assert i_foi[1] == 0 and i_foi[0] > 0  # channel 1 is zero on every object position
    assert (tli > 0).all()  # the task loss sees both channels
    # the guide's features and logits are what FOI compares with
    feats, logits = run_guide(foi.guide, images, 1)
    assert len(feats) == 1 and len(logits) == 1 and bool((objectness(logits[0]) <= 1).all())


def test_foi_for_pruning_only_leaves_the_model_to_the_task_loss():
    trained = {}
    for name, optimize in (("both", True), ("prune-only", False), ("task", None)):
        student, fisher, foi, images = toy_state(bool(optimize))
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        opt.add_param_group({"params": list(foi.loss.parameters())})
        train_step(student, (images, [{}, {}]), fisher, opt, foi if optimize is not None else None)
        trained[name] = torch.cat([p.detach().flatten() for p in student.parameters()])
        if optimize is False:
            assert fisher.scores("foi", "body", 2)[0] > 0  # still scored for pruning
    torch.testing.assert_close(trained["prune-only"], trained["task"])
    assert not torch.allclose(trained["both"], trained["task"])


# ---------------------------------------------------------------- combination, registry


def test_combination_formula_on_known_tensors():
    tli, foi, iri = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([2.0, 0.5])
    torch.testing.assert_close(combine(tli, foi, iri), torch.tensor([8.0, 3.0]))
    torch.testing.assert_close(combine(tli, None, iri), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(combine(tli, foi, None), torch.tensor([4.0, 6.0]))


ABLATIONS = {
    "miep": {"tli": True, "foi": True, "iri": True, "foi_optimize": True},
    "miep-tli": {"tli": True, "foi": False, "iri": False},
    "miep-tli-foi": {"foi": True, "iri": False},
    "miep-tli-iri": {"foi": False, "iri": True},
    "miep-phipre": {"foi": True, "iri": False, "foi_objectness": False},
    "miep-foi-pruneonly": {"foi": True, "iri": False, "foi_optimize": False},
    "miep-mse": {"foi": True, "iri": False, "foi_similarity": "mse"},
    "miep-kmeans": {"iri": True, "iri_algorithm": "kmeans"},
    "miep-distance": {"iri": True, "iri_stop": "distance", "iri_distance": 0.8},
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_presets(name: str):
    method = METHODS[name]
    assert method.family == "miep"
    opts = resolve_options(method, {})
    assert {k: opts[k] for k in ABLATIONS[name]} == ABLATIONS[name]
    assert opts["normalize_flops"] and opts["lr_scale"] == 0.2
    assert resolve_options(method, {"foi": False, "iri_ratio": 0.2})["foi"] is False


def test_progressive_miep_on_the_detector(tmp_path):
    report = check_progressive_run("miep", tmp_path)
    assert report["options"]["foi"] and report["options"]["iri"]
    info = [s["info"] for s in report["progress"]]
    # identity adapters, guide BN on the batch's statistics: 0 before anything was pruned
    assert info[0] == pytest.approx(0.0, abs=1e-5)
    assert all(v > 1e-3 for v in info[1:])  # then the pruned student departs from the guide
    opts = report["options"]
    assert (opts["foi_scale"], opts["foi_adapter"], opts["iri_normalize"]) == (
        "raw",
        "prune",
        False,
    )
    for step in report["progress"]:  # the per-step log of the terms (issue 21)
        assert step["tli_total"] > 0 and step["foi_total"] >= 0 and step["foi_scale"] == 1.0
        assert step["foi_tli_ratio"] == pytest.approx(step["foi_total"] / step["tli_total"])
        assert step["info_task_ratio"] == pytest.approx(step["info"] / step["loss"])
        assert step["iri_discounted"] > 0 and 0 <= step["iri_lowest_l1_share"] <= 1
    assert any(step["foi_total"] > 0 for step in report["progress"])


def test_progressive_miep_ablation_options_on_the_detector(tmp_path):
    """FOI matched to TLI, IRI on unit-norm descriptors, adapters refitted: the run still
    reaches its target and replays; the matched totals are equal at every step."""
    options = {"foi_scale": "matched", "iri_normalize": True, "foi_adapter": "refit"}
    report = check_progressive_run("miep", tmp_path, **options)
    assert {k: report["options"][k] for k in options} == options
    for step in report["progress"]:
        if step["foi_total"] > 0:
            matched = step["foi_scale"] * step["foi_total"]
            assert matched == pytest.approx(step["tli_total_foi_groups"])


@torch.no_grad()
def test_refit_fits_each_width_of_a_neck_with_levels_of_different_widths():
    """SSD-like neck: levels of different widths (an FPN's share one). After pruning, each
    level's adapter is refitted by least squares to the guide, here an exact 1x1 map."""
    torch.manual_seed(0)
    student = [torch.randn(4, 3, 6, 6), torch.randn(4, 5, 3, 3)]
    maps = [nn.Conv2d(3, 4, 1), nn.Conv2d(5, 6, 1)]
    guide = [m(s) for m, s in zip(maps, student, strict=True)]
    loss = InfoLoss("cosine", use_objectness=False, adapter="refit")
    loss.setup([torch.randn(1, 4, 6, 6), torch.randn(1, 6, 3, 3)], guide)  # unpruned widths
    assert loss.refit(student, guide) == [0, 1]
    assert [(a.in_channels, a.out_channels) for a in loss.adapters] == [(3, 4), (5, 6)]
    for adapter, m in zip(loss.adapters, maps, strict=True):
        assert torch.allclose(adapter.weight, m.weight, atol=0.05)
    assert float(loss(student, guide, [None, None])) == pytest.approx(0.0, abs=1e-3)
    assert loss.refit(student, guide) == []  # nothing stale any more
