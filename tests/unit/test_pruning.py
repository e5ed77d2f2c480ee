"""Real torch-pruning surgery on the registry's Faster R-CNN, and checkpoint round trips."""

from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from detprune.evaluation.cost import count_macs, count_params
from detprune.models import MODELS, build_model
from detprune.pruning.importance.magnitude import l1_importance
from detprune.pruning.procedures.oneshot import macs_counter, prune_to_flops
from detprune.train import checkpoint

NAME = "fasterrcnn_narrow_fpn"
SIZE = 64


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    spec = checkpoint.model_spec(NAME, 3, {"image_size": SIZE})
    model = build_model(NAME, 3, spec["kwargs"]).eval()
    entry = MODELS[NAME]
    macs_fn = macs_counter(SIZE, entry.per_roi_modules, spec["kwargs"]["rpn_post_nms_top_n_test"])
    result = prune_to_flops(
        model,
        importance=l1_importance(),
        target=0.5,
        example=checkpoint.example_inputs(spec),
        ignored=list(entry.ignored_layers),
        macs_fn=macs_fn,
    )
    return spec, model, result, macs_fn


def test_pruned_model_is_physically_smaller_and_hits_the_target(pruned):
    spec, model, result, macs_fn = pruned
    assert count_params(result.model) < 0.75 * count_params(model)
    kept = macs_fn(result.model) / macs_fn(model)
    assert abs(kept / 0.5 - 1) <= 0.02
    assert result.report["flops_kept"] == pytest.approx(kept)
    # channels really went: some backbone conv is narrower than before
    layers = result.report["layers"]
    assert layers["backbone.body.layer4.0.conv1"][0] < layers["backbone.body.layer4.0.conv1"][1]
    # ignored layers are untouched
    for name in MODELS[NAME].ignored_layers:
        assert layers[name][0] == layers[name][1]


def test_pruned_model_runs_forward_in_train_and_eval(pruned):
    _, _, result, _ = pruned
    m = result.model
    image = torch.rand(3, SIZE, SIZE)
    m.eval()
    with torch.no_grad():
        out = m([image])
    assert out[0]["boxes"].shape[1] == 4
    m.train()
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}
    losses = m([image], [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    m.eval()


def test_checkpoint_reloads_with_weights_only(pruned, tmp_path: Path):
    spec, _, result, _ = pruned
    path = tmp_path / "pruned.pt"
    checkpoint.save(path, spec=spec, model=result.model, history=result.history, meta={"m": 1})
    raw = torch.load(path, weights_only=True)  # would raise on any pickled object
    assert raw["format"] == checkpoint.FORMAT and raw["pruning_history"]
    reloaded, ckpt = checkpoint.load_model(path)
    assert count_params(reloaded) == count_params(result.model)
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    result.model.eval()
    reloaded.eval()
    with torch.no_grad():
        a = result.model.backbone(image[None])
        b = reloaded.backbone(image[None])
    for key in a:
        assert torch.equal(a[key], b[key])


def test_bad_checkpoints_name_file_and_field(tmp_path: Path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable"):
        checkpoint.load(junk)
    partial = tmp_path / "partial.pt"
    torch.save({"format": checkpoint.FORMAT, "model": {"name": NAME}}, partial)
    with pytest.raises(ValueError, match="partial.pt: checkpoint lacks field 'pruning_history'"):
        checkpoint.load(partial)


def test_macs_count_is_exact_on_a_known_layer():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images):
            return self.net(torch.stack(images))

    macs = count_macs(Wrap(), 10)["macs"]
    assert macs == 10 * 10 * 8 * 3 * 9 + 10 * 10 * 4 * 8


def test_l1_removes_a_zeroed_filter_first():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 3))
    with torch.no_grad():
        net[0].weight[4].zero_()
        net[1].weight[4] = 0.0
        net[1].bias[4] = 0.0
        for i in range(6):
            if i != 4:
                net[0].weight[i].fill_(0.5 + i)
                net[1].weight[i] = 1.0
    marker = net[3].weight.detach().clone()
    pruner = tp.pruner.MetaPruner(
        net, torch.rand(1, 3, 8, 8), l1_importance(), pruning_ratio=1 / 6, ignored_layers=[net[3]]
    )
    pruner.step()
    assert net[0].out_channels == 5
    kept = [i for i in range(6) if i != 4]
    assert torch.equal(net[3].weight, marker[:, kept])


def test_per_layer_pruning_closes_the_jump_between_two_ratios():
    """Eight equal 16-channel layers pruned by one shared ratio lose a channel each at the
    same ratio: the kept share jumps past the target. The core then moves layers one by one
    to the next ratio and lands within the tolerance."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1)]
    for _ in range(7):
        layers += [nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
    model = nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(16, 2, 1)).eval()
    example = torch.randn(1, 3, 16, 16)

    def macs(m: nn.Module) -> int:
        return int(tp.utils.count_ops_and_params(m, example)[0])

    # 2 channels fewer in every layer keep ~(14/16)^2 = 0.77 of the MACs, 3 fewer ~0.66
    target = 0.72
    result = prune_to_flops(
        model,
        importance=l1_importance(),
        target=target,
        example=example,
        ignored=["16"],
        macs_fn=macs,
        global_pruning=False,
        tolerance=0.02,
    )
    report = result.report
    assert abs(report["flops_kept"] / target - 1) <= 0.02
    widths = sorted({w for w, _ in report["layers"].values() if w != 2})
    assert widths == [13, 14]  # some layers lose 3 channels, the others 2
    assert any(t["layers_at_next"] > 0 for t in report["trials"])


def test_global_pruning_honours_the_max_layer_ratio():
    """A layer whose channels all score near zero would fall entirely under the global
    threshold; torch-pruning then skips it whole. The core caps it at max_layer_ratio."""
    from detprune.pruning.procedures.oneshot import prune_once

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 2, 1),
    ).eval()  # fmt: skip
    l1 = l1_importance()

    def importance(group):  # every channel of the middle layer scores (almost) nothing
        if getattr(group[0].dep.target.module, "tiny", False):
            return 1e-6 * torch.arange(1.0, 17.0)
        return l1(group)

    model[2].tiny = True  # survives the copy the core prunes
    opts = {"global_pruning": True, "max_layer_ratio": 0.75, "round_to": None}
    example = torch.randn(1, 3, 8, 8)
    pruned, _ = prune_once(model, example, importance, 0.4, ["6"], opts)
    widths = [pruned[i].out_channels for i in (0, 2, 4)]
    assert widths[1] == 4  # the tiny layer: down to 25% (the cap), not skipped, not emptied
    assert sum(widths) == int(48 * (1 - 0.4))  # the global share is still met
    assert widths[0] < 16 and widths[2] < 16
