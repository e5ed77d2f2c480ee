"""Sparse-training regularizers: Network Slimming's constant rate and GCP's dynamic one."""

import pytest
import torch
from torch import nn

from detprune.train.sparsity import (
    REGULARIZERS,
    SparsityContext,
    describe_gammas,
    dynamic_rates,
    gamma_histogram,
)

S = 1e-3


def _net(gammas: list[list[float]]) -> nn.Sequential:
    """Conv-BN pairs whose BN scales are ``gammas`` and whose scale gradients are 0."""
    layers: list[nn.Module] = []
    c_in = 1
    for g in gammas:
        bn = nn.BatchNorm2d(len(g))
        with torch.no_grad():
            bn.weight.copy_(torch.tensor(g))
        bn.weight.grad = torch.zeros(len(g))
        layers += [nn.Conv2d(c_in, len(g), 1), bn]
        c_in = len(g)
    return nn.Sequential(*layers)


def _hook(name: str, net: nn.Module, **options):
    ctx = SparsityContext(options, [], torch.rand(1, 1, 4, 4))
    return REGULARIZERS[name](net, ctx)


def _signed(n: int) -> list[float]:
    """|gamma| = 1..n with alternating signs."""
    return [float(i) * (-1) ** i for i in range(1, n + 1)]


def test_dynamic_rate_equal_before_the_switch_and_one_percent_on_the_top_35_after():
    gammas = _signed(20)
    net = _net([gammas])
    hook = _hook("bn_l1_dynamic", net, s=S)  # switch 0.4, percentile 65, factor 0.01
    bn = net[1]
    hook(net, 0.39)
    sign = torch.sign(torch.tensor(gammas))
    assert torch.allclose(bn.weight.grad, S * sign)
    bn.weight.grad.zero_()
    hook(net, 0.4)
    rate = bn.weight.grad / sign
    top = torch.tensor(gammas).abs() >= 14  # the 65th percentile of 1..20 is 13.35
    assert int(top.sum()) == 7  # 35% of 20
    assert torch.allclose(rate[top], torch.full((7,), 0.01 * S))
    assert torch.allclose(rate[~top], torch.full((13,), S))


def test_dynamic_percentile_is_taken_over_all_regularized_layers():
    net = _net([[1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]])
    hook = _hook("bn_l1_dynamic", net, s=S, percentile=50)  # median of 1..10 = 5.5
    hook(net, 0.9)
    assert torch.allclose(net[1].weight.grad, torch.full((5,), S))
    assert torch.allclose(net[3].weight.grad, torch.full((5,), 0.01 * S))


@pytest.mark.parametrize("options", [{"factor": 1.0}, {"switch": 1.0}])
def test_constant_rate_is_a_setting_of_the_dynamic_rule(options):
    gammas = _signed(20)
    for progress in (0.0, 0.5, 0.99, 1.0):
        net = _net([gammas])
        _hook("bn_l1_dynamic", net, s=S, **options)(net, progress)
        assert torch.allclose(net[1].weight.grad, S * torch.sign(torch.tensor(gammas)))


def test_dynamic_rates_function_on_a_hand_case():
    rates = dynamic_rates(torch.tensor([0.1, -0.2, 0.3, -0.4]), 2.0, 0.5, percentile=50)
    assert rates.tolist() == pytest.approx([2.0, 2.0, 0.02, 0.02])
    assert dynamic_rates(torch.tensor([0.1, 0.4]), 2.0, 0.2).tolist() == [2.0, 2.0]


def test_network_slimming_and_group_l2_still_work():
    net = _net([[1.0, -2.0, 3.0]])
    _hook("bn_l1", net, s=1e-4)(net, 0.9)
    assert torch.allclose(net[1].weight.grad, torch.tensor([1e-4, -1e-4, 1e-4]))
    net = _net([[1.0, -2.0, 3.0]])
    net[0].weight.grad = torch.zeros_like(net[0].weight)
    _hook("group_l2", net, reg=0.1)(net, 0.5)
    assert net[0].weight.grad.abs().sum() > 0  # the group-norm penalty reached the conv


def test_bad_percentile_is_rejected():
    with pytest.raises(ValueError, match="percentile"):
        _hook("bn_l1_dynamic", _net([[1.0]]), percentile=120)


def test_config_declares_the_dynamic_defaults(default_config):
    opts = default_config["sparse"]["regularizers"]["bn_l1_dynamic"]
    assert opts == {"s": 0.001, "switch": 0.4, "percentile": 65, "factor": 0.01}


def test_gamma_histogram_on_a_hand_built_model():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 1),
        nn.BatchNorm2d(4),
        nn.GroupNorm(2, 4),  # not a BatchNorm: not counted
        nn.BatchNorm2d(4, affine=False),  # no scales: not counted
        nn.Flatten(),
        nn.BatchNorm1d(4),
    )
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([5e-4, -5e-3, 0.5, 1.0]))
        net[5].weight.copy_(torch.tensor([-1e-4, 0.02, 8e-3, -2.0]))
    stats = gamma_histogram(net)
    assert stats["layers"] == 2 and stats["count"] == 8
    # |gamma| sorted: 1e-4, 5e-4 | 5e-3, 8e-3 | 0.02, 0.5, 1, 2
    assert stats["share_below"] == {"1e-2": 0.5, "1e-3": 0.25}
    q = stats["quantiles"]
    assert list(q) == ["p5", "p25", "p50", "p75", "p95"]
    # linear interpolation at (n - 1) * p of the sorted values
    expect = [1e-4 + 0.35 * 4e-4, 5e-4 + 0.75 * 4.5e-3, (8e-3 + 0.02) / 2, 0.625, 1.65]
    assert list(q.values()) == pytest.approx(expect)
    line = describe_gammas(stats)
    assert "8 |gamma| in 2 BN layers" in line and "50.0% < 1e-2" in line and "25.0% < 1e-3" in line
    assert gamma_histogram(nn.Conv2d(1, 1, 1)) == {"layers": 0, "count": 0}


def test_sparse_stage_records_the_gamma_distribution_before_and_after(tiny_config, tmp_path):
    from detprune import stages
    from detprune.data.coco import CocoDetection
    from detprune.data.synth import write_synthetic
    from detprune.models import build_model
    from detprune.train import checkpoint

    write_synthetic(
        tmp_path / "d", seed=0, num_train=8, num_val=2, image_size=64, min_objects=1, max_objects=3
    )
    ann, images = tmp_path / "d/instances_train.json", tmp_path / "d/train"
    torch.manual_seed(0)
    num_classes = CocoDetection(ann, images).num_classes
    spec = checkpoint.model_spec("fasterrcnn_narrow_fpn", num_classes, {"image_size": 64})
    model = build_model(spec["name"], spec["num_classes"], spec["kwargs"])
    with torch.no_grad():  # scales spread over [0, 1) so the histogram is not one value
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features))
    base = tmp_path / "base.pt"
    checkpoint.save(base, spec=spec, model=model, history=[], meta={})
    cfg = {**tiny_config, "seed": 0}
    cfg["sparse"]["schedule"] = {**cfg["sparse"]["schedule"], "device": "cpu"}
    cfg["sparse"]["regularizers"] = {"bn_l1": {"s": 5.0}}  # strong: visible in 2 steps
    out = tmp_path / "sparse.pt"
    stages.sparse(cfg, "bn_l1", str(base), str(ann), str(images), str(out))
    gamma = checkpoint.load(out)["meta"]["gamma"]
    trained, _ = checkpoint.load_model(out)
    assert gamma["before"] == gamma_histogram(model)
    assert gamma["after"] == gamma_histogram(trained)
    assert gamma["before"]["count"] == gamma["after"]["count"] == gamma_histogram(model)["count"]
    assert gamma["after"]["quantiles"]["p50"] < gamma["before"]["quantiles"]["p50"]
