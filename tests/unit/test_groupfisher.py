"""GroupFisher: mask Fisher over coupled groups, FLOPs costs, progressive pruning."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from detprune.pruning.importance.fisher import (
    GroupInfo,
    MaskFisher,
    ProgressiveImportance,
    channel_costs,
    prunable_groups,
)
from detprune.pruning.methods import METHODS
from detprune.pruning.procedures.progressive import resolve_options, select_channels
from tests.unit.progressive_run import check_progressive_run


def chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)
    )


class Residual(nn.Module):
    """Two BN outputs added: their channels are coupled and share one mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))


def fisher_of(net: nn.Module, x: torch.Tensor, ignored: list[str], coupling: str = "shared_mask"):
    net.eval()
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=x[:1])
    groups = prunable_groups(dg, net, ignored)
    fisher = MaskFisher(net, groups, coupling)
    net.train()
    with fisher.masks(len(x)):
        loss = net(x).pow(2).mean()
    loss.backward()
    fisher.collect("tli")
    return dg, groups, fisher


def test_mask_fisher_matches_the_formula_and_is_zero_for_a_dead_channel():
    net = chain()
    with torch.no_grad():
        net[3].weight[:, 2] = 0  # channel 2 reaches nothing downstream
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dg, groups, fisher = fisher_of(net, x, ["3"])
    assert [g.root_name for g in groups] == ["0"]
    assert [t.name for t in groups[0].taps] == ["1"]  # the BN after the conv
    scores = fisher.scores("tli", "0", 6)
    # by hand: g_nc = sum_hw F * dL/dF at the BN output; Fisher = sum_n g^2 / 2 / N
    feat = net[1](net[0](x))
    feat.retain_grad()
    net[3](net[2](feat)).pow(2).mean().backward()
    g = (feat * feat.grad).sum((2, 3))
    torch.testing.assert_close(scores, (g.double().pow(2).sum(0) / 2 / 3), rtol=1e-5, atol=1e-12)
    assert scores[2] == 0 and bool((scores[[0, 1, 3, 4, 5]] > 0).all())
    # GroupFisher removes it first
    chosen = select_channels(
        groups, {"0": scores}, {"0": 1.0}, {"0": 1}, remaining=1.0, budget=1.0, allowance=1.0
    )
    assert [(info.root_name, idxs) for info, idxs in chosen] == [("0", [2])]
    original = net[0].weight.detach().clone()
    dg.get_pruning_group(groups[0].root_module, groups[0].pruning_fn, [2]).prune()
    assert net[0].out_channels == 5 and net[1].num_features == 5 and net[3].in_channels == 5
    kept = [next(i for i in range(6) if torch.equal(original[i], w)) for w in net[0].weight]
    assert kept == [0, 1, 3, 4, 5]
    assert dg.pruning_history() == [["0", True, [2]]]


def test_coupled_channels_share_one_mask():
    net = Residual()
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    _, groups, shared = fisher_of(net, x, ["head"])
    assert len(groups) == 1 and sorted(t.name for t in groups[0].taps) == ["bn_a", "bn_b"]
    _, _, summed = fisher_of(net, x, ["head"], coupling="sum")
    ya, yb = net.bn_a(net.a(x)), net.bn_b(net.b(x))
    ya.retain_grad()
    yb.retain_grad()
    net.head(torch.relu(ya + yb)).pow(2).mean().backward()
    ga, gb = ((y * y.grad).sum((2, 3)).double() for y in (ya, yb))
    root = groups[0].root_name
    expect_shared = (ga + gb).pow(2).sum(0) / 2 / 4
    expect_sum = (ga.pow(2) + gb.pow(2)).sum(0) / 2 / 4
    torch.testing.assert_close(shared.scores("tli", root, 4), expect_shared, rtol=1e-5, atol=0)
    torch.testing.assert_close(summed.scores("tli", root, 4), expect_sum, rtol=1e-5, atol=0)


def test_flops_cost_of_a_channel_and_normalised_importance():
    net = chain()
    x = torch.rand(2, 3, 8, 8)
    dg, groups, fisher = fisher_of(net, x, ["3"])
    layer_macs = {"0": 8 * 8 * 6 * 3 * 9, "3": 8 * 8 * 4 * 6 * 9}
    cost = channel_costs(dg, groups[0], layer_macs)
    assert cost == pytest.approx(8 * 8 * 3 * 9 + 8 * 8 * 4 * 9)  # conv0 filter + conv3 slice
    imp = ProgressiveImportance(fisher, dg, groups, costs={"0": cost})
    full = imp(groups[0].group)
    torch.testing.assert_close(full, fisher.scores("tli", "0", 6) / cost)
    subset = dg.get_pruning_group(net[0], groups[0].pruning_fn, [1, 4])
    torch.testing.assert_close(imp(subset), full[[1, 4]])


def test_selection_respects_widths_allowance_and_budget():
    a, b = GroupInfo(None, "a", 4), GroupInfo(None, "b", 3)
    scores = {"a": torch.tensor([0.1, 0.2, 5.0, 6.0]), "b": torch.tensor([0.05, 7.0, 8.0])}
    costs = {"a": 10.0, "b": 100.0}
    keep = {"a": 2, "b": 1}
    pick = select_channels(
        [a, b], scores, costs, keep, remaining=1e9, budget=1e9, allowance=1e9, count=3
    )
    assert {i.root_name: idx for i, idx in pick} == {"b": [0], "a": [0, 1]}
    # "a" may lose 2 channels at most; "b" does not fit in an allowance of 50 MACs
    pick = select_channels([a, b], scores, costs, keep, remaining=1e9, budget=1e9, allowance=50)
    assert {i.root_name: idx for i, idx in pick} == {"a": [0, 1]}
    # stops once the budget (or the target) is reached
    pick = select_channels([a, b], scores, costs, keep, remaining=1e9, budget=15, allowance=1e9)
    assert {i.root_name: idx for i, idx in pick} == {"b": [0]}


def test_groupfisher_preset_and_user_override():
    method = METHODS["groupfisher"]
    assert method.family == "groupfisher"
    opts = resolve_options(method, {"interval": 3})
    assert opts["tli"] and not opts["foi"] and not opts["iri"] and opts["normalize_flops"]
    assert opts["interval"] == 3 and opts["lr_scale"] == 0.2


def test_progressive_groupfisher_on_the_detector(tmp_path):
    report = check_progressive_run("groupfisher", tmp_path)
    assert report["options"]["normalize_flops"] and not report["options"]["foi"]


class _Losses(nn.Module):
    """A detector's interface, ``model(images, targets) -> {name: loss}``, on the chain."""

    def __init__(self) -> None:
        super().__init__()
        self.net = chain()

    def forward(self, images: torch.Tensor, targets: list) -> dict[str, torch.Tensor]:
        return {"loss": 1e3 * self.net(images).pow(2).mean()}


def test_pruning_stage_steps_clip_the_gradient_norm():
    from detprune.pruning.procedures.progressive import DEFAULTS, train_step

    assert DEFAULTS["clip_grad_norm"] == 35.0
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    moved = {}
    for clip in (None, 1.0):
        model = _Losses()
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=(x[:1], []))
        fisher = MaskFisher(model, prunable_groups(dg, model, ["net.3"]), "shared_mask")
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        out = train_step(model, (x, []), fisher, opt, None, clip)
        moved[clip] = torch.cat(
            [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
        ).norm()
        assert out.get("clipped") == (None if clip is None else 1.0)
    assert float(moved[None]) > 10.0  # the unclipped step: lr 1 times a large gradient
    assert float(moved[1.0]) == pytest.approx(1.0, rel=1e-4)  # lr 1 times norm 1


def test_groupnorm_channels_go_slot_wise_and_two_stay_per_block():
    from detprune.pruning.procedures.progressive import select_channels

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.rand(1, 3, 8, 8))
    groups = prunable_groups(dg, net, ["3"])
    (info,) = groups
    assert (info.root_name, info.width, info.channel_groups) == ("0", 8, 2)
    # slot j is channels j and j + 4; slot 1 is the least important on average
    scores = {"0": torch.tensor([5.0, 0.1, 3.0, 4.0, 5.0, 0.3, 3.0, 4.0])}
    args = {"costs": {"0": 1.0}, "keep": {"0": 1}, "allowance": 100.0}
    chosen = select_channels(groups, scores, remaining=100.0, budget=2.0, **args)
    assert [(i.root_name, idxs) for i, idxs in chosen] == [("0", [1, 5])]
    chosen = select_channels(groups, scores, remaining=100.0, budget=100.0, **args)
    assert chosen[0][1] == [1, 2, 5, 6]  # two channels stay in each block of GroupNorm
    group = dg.get_pruning_group(info.root_module, info.pruning_fn, chosen[0][1])
    group.prune()
    assert net[1].num_channels == 4 and net(torch.rand(2, 3, 8, 8)).shape == (2, 4, 6, 6)
