"""Each criterion does what its paper says, on small constructed networks."""

from types import SimpleNamespace

import pytest
import torch
import torch_pruning as tp
from torch import nn

from detprune.pruning.methods import METHODS
from detprune.pruning.procedures.oneshot import accumulate_gradients
from detprune.train.sparsity import SparsityContext, bn_l1


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)
    )


def prune_one(net: nn.Sequential, method: str, seed: int = 0) -> list[int]:
    """Prune one of the six channels with ``method``; return the kept original indices."""
    original = net[0].weight.detach().clone()
    imp = METHODS[method].importance(SimpleNamespace(seed=seed, model=net))
    pruner = tp.pruner.MetaPruner(
        net, torch.rand(1, 3, 8, 8), imp, pruning_ratio=1 / 6, ignored_layers=[net[3]]
    )
    pruner.step()
    assert net[0].out_channels == 5 and net[3].in_channels == 5
    return [next(i for i in range(6) if torch.equal(original[i], w)) for w in net[0].weight]


def test_l1_removes_the_zeroed_filter():
    net = small_net()
    with torch.no_grad():
        net[0].weight[2].zero_()
        net[0].bias[2] = 0
    assert prune_one(net, "l1") == [0, 1, 3, 4, 5]


def test_slim_removes_the_smallest_gamma_after_sparse_training():
    net = small_net()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, 0.9, 0.8, 0.05, 0.7, 0.6]))
    hook = bn_l1(net, SparsityContext({"s": 0.01}, [], []))
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    before = net[1].weight.detach().abs().sum()
    for _ in range(3):
        opt.zero_grad()
        (net(torch.rand(2, 3, 8, 8)).sum() * 0).backward()  # only the penalty acts
        hook(net, 0.5)
        opt.step()
    assert float(net[1].weight.detach().abs().sum()) == pytest.approx(
        float(before) - 0.18, abs=1e-5
    )
    assert prune_one(net, "slim") == [0, 1, 2, 4, 5]


def test_fpgm_removes_a_filter_that_duplicates_the_others_median():
    net = small_net()
    with torch.no_grad():
        w = net[0].weight
        w[4] = (w[0] + w[1] + w[2] + w[3] + w[5]) / 5
        w[1] = w[4]  # filter 1 duplicates filter 4, both sit at the centre of the rest
    kept = prune_one(net, "fpgm")
    assert len(kept) == 5 and (1 not in kept or 4 not in kept)


def _dead_channel_net() -> nn.Sequential:
    net = small_net()
    with torch.no_grad():
        net[3].weight[:, 5].zero_()  # channel 5 reaches nothing: zero mask gradient
    return net


def test_taylor_removes_the_channel_whose_gradient_is_zero():
    net = _dead_channel_net()
    net.train()
    x = torch.rand(4, 3, 8, 8)
    net.zero_grad()
    (net(x) ** 2).mean().backward()
    assert net[0].weight.grad[5].abs().sum() == 0
    w3 = net[3].weight.detach().clone()
    imp = METHODS["taylor"].importance(SimpleNamespace(seed=0, model=net))
    pruner = tp.pruner.MetaPruner(
        net, torch.rand(1, 3, 8, 8), imp, pruning_ratio=1 / 6, ignored_layers=[net[3]]
    )
    pruner.step()
    assert torch.equal(net[3].weight, w3[:, :5])


def test_random_is_repeatable_for_a_seed_and_differs_between_seeds():
    a = prune_one(small_net(), "random", seed=0)
    b = prune_one(small_net(), "random", seed=0)
    assert a == b
    others = {tuple(prune_one(small_net(), "random", seed=s)) for s in range(1, 8)}
    assert len(others | {tuple(a)}) > 1


def test_accumulate_gradients_sums_over_batches():
    model = nn.Linear(2, 1)

    class Det(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, images, targets):
            return {"l": self.lin(torch.stack(images)).sum()}

    det = Det()
    batch = ([torch.ones(2)], [{}])
    assert accumulate_gradients(det, iter([batch] * 5), 3) == 3
    assert torch.equal(model.weight.grad, torch.full((1, 2), 3.0))
