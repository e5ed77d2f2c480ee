"""GCP: group thresholds, coupled scores, beta folding, and the method on the detector."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detprune import stages
from detprune.evaluation.cost import count_params
from detprune.models import MODELS, build_model
from detprune.pruning.base import PruneContext
from detprune.pruning.methods import METHODS
from detprune.pruning.procedures.gcp import (
    Unit,
    apply_plan,
    coupled_units,
    layer_minimum,
    scale_group_of,
    select_channels,
)
from detprune.pruning.procedures.oneshot import macs_counter
from detprune.train import checkpoint

NAME = "fasterrcnn_narrow_fpn"
SIZE = 64
IGNORED = list(MODELS[NAME].ignored_layers)


# --- group thresholds -----------------------------------------------------------------


def test_threshold_removes_the_lowest_fraction_of_the_group():
    units = [
        Unit("a", "g", torch.tensor([0.9, 0.1, 0.5, 0.3])),
        Unit("b", "g", torch.tensor([0.2, 0.8, 0.05, 0.7])),
        Unit("c", "other", torch.tensor([0.0, 0.0])),
    ]
    # 50% of the 8 channels of g: scores 0.05, 0.1, 0.2, 0.3 go; group "other" keeps all
    assert select_channels(units, {"g": 0.5, "other": 0.0}, 1) == {"a": [1, 3], "b": [0, 2]}
    # a per-layer minimum of 3 channels: each layer may lose only its lowest one
    assert select_channels(units, {"g": 0.5}, 3) == {"a": [1], "b": [2]}
    assert layer_minimum(256, 4) == 4 and layer_minimum(2048, 16) == 21
    assert layer_minimum(3, 16) == 3


def test_scale_group_is_the_longest_prefix_match():
    groups = {"stem": ("body",), "deep": ("body.layer4",), "head": ("rpn",)}
    assert scale_group_of("body.layer4.0.conv1", groups) == "deep"
    assert scale_group_of("body.layer1.0.conv1", groups) == "stem"
    assert scale_group_of("body.layer40", groups) == "stem"
    assert scale_group_of("roi_heads.fc6", groups) is None


@pytest.fixture(scope="module")
def detector():
    """The CPU detector with sparse-looking scales: half of every BN's |gamma| ~ 1e-3."""
    torch.manual_seed(0)
    spec = checkpoint.model_spec(NAME, 3, {"image_size": SIZE})
    model = build_model(NAME, 3, spec["kwargs"]).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                small = torch.rand(m.num_features, generator=gen) < 0.5
                m.weight[small] = 1e-3 * torch.rand(int(small.sum()), generator=gen)
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return spec, model


def test_group_fraction_and_per_layer_minimum_on_the_detector(detector):
    spec, model = detector
    entry = MODELS[NAME]
    units = coupled_units(model, (checkpoint.example_inputs(spec),), IGNORED, entry.groups)
    by_group = {}
    for u in units:
        by_group.setdefault(u.group, []).append(u)
    assert set(by_group) == set(entry.groups)
    deep = by_group["stride16"]
    total = sum(len(u.scores) for u in deep)
    assert total == 256  # layer3: residual group (128) + conv1 (128)
    plan = select_channels(units, {"stride16": 0.3}, 4)
    assert set(plan) <= {u.root for u in deep}
    assert sum(len(v) for v in plan.values()) == round(0.3 * total)
    removed = torch.cat([u.scores[plan[u.root]] for u in deep if u.root in plan])
    kept = torch.cat(
        [u.scores[[i for i in range(len(u.scores)) if i not in plan.get(u.root, [])]] for u in deep]
    )
    assert removed.max() <= kept.min()  # everything under one group threshold
    full = select_channels(units, {"stride32": 1.0}, 4)
    for u in by_group["stride32"]:
        assert len(full[u.root]) == len(u.scores) - 4  # 4 channels stay per layer


def test_coupled_scores_are_the_max_of_the_coupled_bns(detector):
    spec, model = detector
    units = coupled_units(model, (checkpoint.example_inputs(spec),), IGNORED, MODELS[NAME].groups)
    res = next(u for u in units if u.root == "backbone.body.layer4.0.downsample.0")
    body = model.backbone.body
    expect = torch.maximum(
        body.layer4[0].bn2.weight.abs(), body.layer4[0].downsample[1].weight.abs()
    )
    assert torch.equal(res.scores, expect.detach())


# --- beta folding ---------------------------------------------------------------------


def _randomize_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
        bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))


def _block(kernel: int, last_bn: bool) -> nn.Sequential:
    """conv-BN-ReLU-conv(-BN) with channels 2 (beta 0.7) and 4 (beta -0.3) at gamma 0."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    layers = [nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU()]
    layers.append(nn.Conv2d(6, 5, kernel, padding=kernel // 2, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm2d(5))
    net = nn.Sequential(*layers)
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m, gen)
    with torch.no_grad():
        net[1].weight[[2, 4]] = 0.0
        net[1].bias[2], net[1].bias[4] = 0.7, -0.3
    return net.eval()


@pytest.mark.parametrize("last_bn", [False, True], ids=["conv-bias", "conv-bn"])
def test_folding_beta_keeps_the_block_output(last_bn):
    net = _block(1, last_bn)
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x)
    pruned, history, stats = apply_plan(net, (x,), {"0": [2, 4]}, fold=True)
    assert pruned[0].out_channels == 4 and pruned[3].in_channels == 4
    assert history == [["0", True, [2, 4]]]
    assert stats == {"folded": 2, "not_constant": 0, "no_target": 0}
    with torch.no_grad():
        assert torch.allclose(pruned(x), ref, atol=1e-5)
    # without folding, the output misses exactly W[:, 2].sum() * relu(0.7) (+ 0 for ch. 4)
    plain, _, _ = apply_plan(net, (x,), {"0": [2, 4]}, fold=False)
    delta = net[3].weight[:, 2].sum((1, 2)) * 0.7
    if last_bn:
        delta = delta * net[4].weight / torch.sqrt(net[4].running_var + net[4].eps)
    with torch.no_grad():
        assert torch.allclose(ref - plain(x), delta.view(1, 5, 1, 1).expand_as(ref), atol=1e-5)


def test_folding_through_a_3x3_conv_is_exact_away_from_the_padded_border():
    net = _block(3, False)
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    pruned, _, _ = apply_plan(net, (x,), {"0": [2, 4]}, fold=True)
    with torch.no_grad():
        ref, out = net(x), pruned(x)
    assert torch.allclose(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)
    assert not torch.allclose(out[..., 0, :], ref[..., 0, :], atol=1e-3)  # the approximation


class _Residual(nn.Module):
    """stem conv-BN-ReLU, a residual conv-BN + identity -> ReLU, a 1x1 head with bias."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv, self.bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn0(self.stem(x)))
        return self.head(F.relu(self.bn(self.conv(y)) + y))


def test_folding_through_a_residual_sum_of_removed_channels():
    torch.manual_seed(0)
    net = _Residual()
    gen = torch.Generator().manual_seed(3)
    for bn in (net.bn0, net.bn):
        _randomize_bn(bn, gen)
    with torch.no_grad():
        net.bn0.weight[1] = 0.0
        net.bn.weight[1] = 0.0
        net.bn0.bias[1], net.bn.bias[1] = 0.4, -0.1  # constant relu(-0.1 + relu(0.4)) = 0.3
    net.eval()
    x = torch.rand(2, 3, 4, 4, generator=gen)
    with torch.no_grad():
        ref = net(x)
    pruned, _, stats = apply_plan(net, (x,), {"stem": [1]}, fold=True)
    assert pruned.conv.in_channels == 3 and pruned.head.in_channels == 3
    assert stats["folded"] == 2  # into conv's BN (running_mean) and into head's bias
    with torch.no_grad():
        assert torch.allclose(pruned(x), ref, atol=1e-5)
        expect = net.head.bias + net.head.weight[:, 1, 0, 0] * 0.3
        assert torch.allclose(pruned.head.bias, expect, atol=1e-6)


# --- the method on the detector -------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_detector(detector):
    spec, model = detector
    entry = MODELS[NAME]
    macs_fn = macs_counter(SIZE, entry.per_roi_modules, spec["kwargs"]["rpn_post_nms_top_n_test"])
    ctx = PruneContext(
        model=model,
        spec=spec,
        entry=entry,
        options={"tolerance": 0.02},
        seed=0,
        device=torch.device("cpu"),
        batches=lambda: iter(()),
        example=checkpoint.example_inputs(spec),
        macs_fn=macs_fn,
        ignored=list(entry.ignored_layers),
    )
    method = METHODS["gcp"]
    return spec, model, method.procedure(ctx, method, 0.5), macs_fn


def test_gcp_reaches_half_the_flops_and_is_physically_smaller(pruned_detector):
    spec, model, result, macs_fn = pruned_detector
    kept = macs_fn(result.model) / macs_fn(model)
    assert abs(kept / 0.5 - 1) <= 0.02
    assert result.report["flops_kept"] == pytest.approx(kept)
    assert count_params(result.model) < 0.6 * count_params(model)
    layers = result.report["layers"]
    for name in MODELS[NAME].ignored_layers:
        assert layers[name][0] == layers[name][1]
    assert all(after >= min(4, before) for after, before in layers.values())
    assert layers["backbone.body.layer4.0.conv1"][0] < 256
    removed = result.report["removed_per_group"]
    assert all(removed[g][0] > 0 for g in MODELS[NAME].groups)
    share = {g: r / n for g, (r, n) in removed.items()}
    assert share["stride4"] < share["stride32"]  # shallow stages pruned least
    assert result.report["beta_folding"]["folded"] > 0
    # at 50 % the scaled fractions stay below 1: no group is cut to the per-layer minimum
    assert result.report["saturated_groups"] == []
    assert all(f < 1.0 for f in result.report["fractions"].values())


def test_gcp_model_runs_and_reloads_to_identical_outputs(pruned_detector, tmp_path: Path):
    spec, _, result, _ = pruned_detector
    m = result.model
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    m.train()
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}
    losses = m([image], [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    m.zero_grad(set_to_none=True)
    path = tmp_path / "gcp.pt"
    checkpoint.save(path, spec=spec, model=m, history=result.history, meta={})
    reloaded, _ = checkpoint.load_model(path)
    m.eval()
    reloaded.eval()
    with torch.no_grad():
        a, b = m([image]), reloaded([image])
        fa, fb = m.backbone(image[None]), reloaded.backbone(image[None])
    assert count_params(reloaded) == count_params(m)
    for key in fa:
        assert torch.equal(fa[key], fb[key])
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(a[0][key], b[0][key])


def test_gcp_through_the_prune_stage_with_configured_fractions(
    detector, tiny_config, tmp_path: Path
):
    from detprune.data.synth import write_synthetic

    spec, model = detector
    write_synthetic(
        tmp_path / "d",
        seed=0,
        num_train=4,
        num_val=2,
        image_size=SIZE,
        min_objects=1,
        max_objects=3,
    )
    base = tmp_path / "base.pt"
    checkpoint.save(base, spec=spec, model=model, history=[], meta={})
    fractions = {
        "stride4": 0.1,
        "stride8": 0.2,
        "stride16": 0.3,
        "stride32": 0.9,
        "neck": 0.5,
        "head": 0.5,
    }
    cfg = {
        **tiny_config,
        "prune": {**tiny_config["prune"], "options": {"gcp": {"fractions": fractions}}},
    }
    record = stages.prune(
        cfg,
        "gcp",
        0.5,
        str(base),
        str(tmp_path / "d/instances_train.json"),
        str(tmp_path / "d/train"),
        str(tmp_path / "p.pt"),
        str(tmp_path / "p.json"),
    )
    assert abs(record["flops_kept"] / 0.5 - 1) <= 0.02
    used = record["fractions"]
    ratio = used["stride32"] / 0.9
    assert all(used[g] == pytest.approx(min(1.0, f * ratio)) for g, f in fractions.items())
    assert record["saturated_groups"] == sorted(g for g, f in fractions.items() if f * ratio >= 1)
    reloaded, _ = checkpoint.load_model(tmp_path / "p.pt")
    assert count_params(reloaded) == record["params_after"]
    with pytest.raises(KeyError, match="unknown groups"):
        bad = {**cfg, "prune": {**cfg["prune"], "options": {"gcp": {"fractions": {"x": 1}}}}}
        stages.prune(
            bad,
            "gcp",
            0.5,
            str(base),
            str(tmp_path / "d/instances_train.json"),
            str(tmp_path / "d/train"),
            str(tmp_path / "q.pt"),
            str(tmp_path / "q.json"),
        )


def test_gcp_methods_are_registered():
    assert METHODS["gcp"].sparsity == METHODS["gcp-sad"].sparsity == "bn_l1_dynamic"
    assert METHODS["gcp"].distill is None and METHODS["gcp-sad"].distill == "sad"
    assert METHODS["gcp"].procedure is METHODS["gcp-sad"].procedure
    assert METHODS["gcp"].family == METHODS["gcp-sad"].family == "gcp"


def test_a_groupnorm_unit_loses_whole_slots():
    from detprune.pruning.procedures.gcp import Unit, select_channels

    scores = torch.tensor([0.9, 0.1, 0.5, 0.8, 0.7, 0.2, 0.4, 0.6])  # two blocks of 4
    unit = Unit("conv", "neck", scores, channel_groups=2)
    plan = select_channels([unit], {"neck": 0.5}, min_channels=1)
    # 4 channels asked: the 2 slots of lowest mean score, (1, 5) and (2, 6)
    assert plan == {"conv": [1, 2, 5, 6]}
    plan = select_channels([unit], {"neck": 1.0}, min_channels=1)
    assert plan == {"conv": [1, 2, 5, 6]}  # at most block - 2 slots: 2 channels per block stay
