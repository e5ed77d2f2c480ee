"""DCP: greedy discrimination-aware channel selection, stages, and the detector end to end."""

from pathlib import Path

import pytest
import torch
from torch import nn

from detprune.data.coco import CocoDetection
from detprune.data.synth import write_synthetic
from detprune.evaluation.cost import count_params
from detprune.models import MODELS, build_model
from detprune.pruning.base import PruneContext, PruneResult
from detprune.pruning.importance.aux_net import aux_positions, forward_order, stage_of
from detprune.pruning.importance.dcp import consumer_of, fit_selected, greedy_select, round_size
from detprune.pruning.methods import METHODS
from detprune.pruning.procedures.oneshot import macs_counter
from detprune.pruning.procedures.reconstruction import Reconstruction
from detprune.train import checkpoint
from detprune.train.engine import make_loader

NAME = "fasterrcnn_narrow_fpn"
SIZE = 64
FAST = {"batches": 1, "aux_batches": 1, "aux_iters": 5, "select_steps": 2, "sgd_iters": 1}


def _layer_and_loss(inputs: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor):
    """A conv whose reconstruction loss against ``teacher`` weights drives the selection."""
    conv = nn.Conv2d(inputs.shape[1], teacher.shape[0], teacher.shape[-1], bias=False)
    with torch.no_grad():
        conv.weight.copy_(student)
        target = nn.functional.conv2d(inputs, teacher)
    consumer = consumer_of("conv", conv, range(inputs.shape[1]), range(inputs.shape[1]))

    def loss_fn(b: int) -> torch.Tensor:
        return nn.functional.mse_loss(conv(inputs), target)

    return conv, consumer, loss_fn


def test_greedy_selection_takes_the_needed_channel_and_skips_a_zero_channel():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 6, 6, generator=gen)
    x[:, 0] = 0.0  # channel 0 carries nothing
    teacher = torch.zeros(2, 4, 1, 1)
    teacher[:, 2] = torch.tensor([[[1.5]], [[-2.0]]])  # the output needs channel 2 only
    student = teacher.clone()
    student[:, 0] = 10.0  # largest weights: a magnitude criterion would keep channel 0
    student[:, 1] = 0.3
    student[:, 3] = -0.3
    conv, consumer, loss_fn = _layer_and_loss(x, teacher, student)
    kept, loss = greedy_select([consumer], 4, 1, loss_fn, 1, steps=1, sgd_iters=2)
    assert kept.tolist() == [2]
    assert loss == pytest.approx(0.0, abs=1e-12)  # warm start from the needed weights
    assert torch.equal(conv.weight[:, [0, 1, 3]], torch.zeros(2, 3, 1, 1))
    # one channel per round up to 3 of 4: every channel but the zero one
    _, consumer, loss_fn = _layer_and_loss(x, teacher, student)
    kept, _ = greedy_select([consumer], 4, 3, loss_fn, 1, steps=3, sgd_iters=1)
    assert kept.tolist() == [1, 2, 3]


def test_reconstruction_after_selection_beats_random_channels_at_the_same_budget():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 8, 8, generator=gen)
    teacher = 0.05 * torch.randn(6, 8, 3, 3, generator=gen)
    teacher[:, [1, 4, 6]] *= 20.0  # three channels carry almost all of the output
    conv, consumer, loss_fn = _layer_and_loss(x, teacher, teacher.clone())
    kept, greedy_loss = greedy_select([consumer], 8, 3, loss_fn, 1, steps=3, sgd_iters=4)
    assert kept.tolist() == [1, 4, 6]

    random_keep = torch.zeros(8, dtype=torch.bool)
    random_keep[torch.randperm(8, generator=torch.Generator().manual_seed(0))[:3]] = True
    assert sorted(torch.nonzero(random_keep).flatten().tolist()) != [1, 4, 6]
    conv, consumer, loss_fn = _layer_and_loss(x, teacher, teacher.clone())
    with torch.no_grad():
        conv.weight.mul_(consumer.slot_mask(random_keep))
    before = float(loss_fn(0).detach())
    opt = torch.optim.SGD([conv.weight], lr=0.01, momentum=0.9)
    random_loss = fit_selected([consumer], random_keep, loss_fn, 1, 12, opt)  # same 3 x 4 steps
    assert random_loss < before  # the SGD steps do fit the selected weights
    assert greedy_loss < 0.1 * random_loss


def _select_with_two_consumers(normalize: bool) -> tuple[list[int], Reconstruction]:
    """Budget 3 of 4 channels read by two 1x1 convs: ``big`` needs channels 0-2 at weights
    ~100, ``small`` needs channel 3 alone at weight 1 (output energies ~1e4 apart)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 6, 6, generator=gen)
    big_w = torch.zeros(3, 4, 1, 1)
    weights = torch.tensor([[1.0, -0.5, 0.8], [0.6, 1.2, -0.9], [-0.7, 0.4, 1.1]])
    big_w[:, :3, 0, 0] = 100.0 * weights
    small_w = torch.zeros(2, 4, 1, 1)
    small_w[:, 3, 0, 0] = torch.tensor([1.0, -1.0])  # the planted channel
    convs = {"big": nn.Conv2d(4, 3, 1, bias=False), "small": nn.Conv2d(4, 2, 1, bias=False)}
    with torch.no_grad():
        convs["big"].weight.copy_(big_w)
        convs["small"].weight.copy_(small_w)
        teacher = [{n: [c(x)] for n, c in convs.items()}]
    consumers = [consumer_of(n, c, range(4), range(4)) for n, c in convs.items()]
    recon = Reconstruction(
        list(convs), [], teacher, normalize=normalize, device=torch.device("cpu")
    )
    recon.calibrate(lambda b: {}, 1)

    def loss_fn(b: int) -> torch.Tensor:
        return recon.error({n: [c(x)] for n, c in convs.items()}, b)

    kept, _ = greedy_select(consumers, 4, 3, loss_fn, 1, steps=3, sgd_iters=1)
    return kept.tolist(), recon


def test_normalised_reconstruction_keeps_a_channel_only_the_small_scale_consumer_needs():
    raw, raw_recon = _select_with_two_consumers(normalize=False)
    rel, rel_recon = _select_with_two_consumers(normalize=True)
    energy = rel_recon.energy
    assert energy == raw_recon.energy
    assert 1e3 < energy["big"] / energy["small"] < 1e5  # the raw errors' scales
    # with no channel selected every consumer weighs the same, and the term keeps the raw
    # sum's overall scale (its balance with the auxiliary loss and the SGD step)
    share = {n: rel_recon.weight[n] * e for n, e in energy.items()}
    assert share["big"] == pytest.approx(share["small"])
    assert sum(share.values()) == pytest.approx(sum(energy.values()))
    # summed raw, the big consumer's gradients decide every round: channel 3 is dropped
    assert raw == [0, 1, 2]
    # relative errors: channel 3 is all of the small consumer's output, kept first
    assert 3 in rel and len(rel) == 3
    records = {r["name"]: r for r in rel_recon.records()}
    assert set(records) == {"big", "small"}
    for name, r in records.items():
        assert r["energy"] == pytest.approx(energy[name], rel=1e-4)
        # no channel selected at the first evaluation: the error is the whole output energy
        assert r["raw_error_first"] == pytest.approx(energy[name], rel=1e-4)
        assert r["raw_error_last"] < r["raw_error_first"]
    assert records["small"]["relative_error_last"] < 1e-3
    assert raw_recon.records()[1]["relative_error_last"] == pytest.approx(1.0, rel=1e-2)


def test_channels_per_round_sets_the_greedy_rounds():
    assert round_size(10, 4) == 3 and round_size(3, 10) == 1
    assert round_size(10, 4, per_round=1) == 1 and round_size(10, 1, per_round=4) == 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 6, 6, generator=gen)
    teacher = torch.randn(2, 4, 1, 1, generator=gen)
    for per_round, rounds in ((None, 1), (1, 3)):
        _, consumer, loss_fn = _layer_and_loss(x, teacher, teacher.clone())
        calls = []

        def counted(b: int, loss_fn=loss_fn, calls=calls) -> torch.Tensor:
            calls.append(b)
            return loss_fn(b)

        kept, _ = greedy_select(
            [consumer], 4, 3, counted, 1, steps=1, sgd_iters=1, per_round=per_round
        )
        assert len(kept) == 3
        # each round: one scoring pass over the batch, then a step and its check
        assert len(calls) == rounds * 3


def test_aux_losses_split_the_resnet_stages_as_dcp_does():
    assert aux_positions(4, 3) == [0, 1, 2]
    assert aux_positions(4, 1) == [1]
    assert aux_positions(4, 6) == [0, 1, 2, 3]
    spec = checkpoint.model_spec(NAME, 3, {"image_size": SIZE})
    model = build_model(NAME, 3, spec["kwargs"])
    order, calls = forward_order(model, checkpoint.example_inputs(spec))
    aux = [MODELS[NAME].aux_features[i][0] for i in aux_positions(4, 3)]
    ends = [order[p] for p in aux]
    assert stage_of(order["backbone.body.layer1.0.conv2"], ends) == 0
    assert stage_of(order["backbone.body.layer3.0.conv1"], ends) == 2
    assert stage_of(order["backbone.body.layer4.0.conv1"], ends) == 3  # the detector's loss
    assert stage_of(order["backbone.fpn.inner_blocks.0.0"], ends) == 3
    assert calls["rpn.head.conv.0.0"] == 5  # one call per pyramid level


def make_context(root: Path, options: dict) -> PruneContext:
    """A PruneContext on the registry detector at 64 px with tiny synthetic data."""
    if not (root / "instances_train.json").exists():
        write_synthetic(
            root, seed=1, num_train=8, num_val=1, image_size=SIZE, min_objects=1, max_objects=3
        )
    data = CocoDetection(root / "instances_train.json", root / "train")
    torch.manual_seed(0)
    spec = checkpoint.model_spec(NAME, data.num_classes, {"image_size": SIZE})
    model = build_model(NAME, data.num_classes, spec["kwargs"]).eval()
    entry = MODELS[NAME]

    def batches():
        epoch = 0
        while True:
            for images, targets in make_loader(data, 4, shuffle=True, seed=0, epoch=epoch):
                yield list(images), list(targets)
            epoch += 1

    return PruneContext(
        model=model,
        spec=spec,
        entry=entry,
        options={"tolerance": 0.02, "max_layer_ratio": 0.9, **options},
        seed=0,
        device=torch.device("cpu"),
        batches=batches,
        example=checkpoint.example_inputs(spec),
        macs_fn=macs_counter(
            SIZE, entry.per_roi_modules, spec["kwargs"]["rpn_post_nms_top_n_test"]
        ),
        ignored=list(entry.ignored_layers),
    )


def check_pruned_detector(method: str, tmp: Path, options: dict) -> tuple[PruneResult, Path]:
    """Prune to 50% FLOPs; check target, size, forward passes and checkpoint round trip.
    Returns the result and its checkpoint (with the auxiliary heads, as the prune stage
    writes it)."""
    torch.set_num_threads(1)
    ctx = make_context(tmp / "synth", options)
    meth = METHODS[method]
    result = meth.procedure(ctx, meth, 0.5)
    pruned = result.model
    kept = ctx.macs_fn(pruned) / ctx.macs_fn(ctx.model)
    assert abs(kept / 0.5 - 1) <= 0.02
    assert result.report["flops_kept"] == pytest.approx(kept)
    assert count_params(pruned) < 0.75 * count_params(ctx.model)
    assert not any(n.startswith("_dcp_aux") for n, _ in pruned.named_modules())
    assert all(not h[0].startswith("_dcp_aux") for h in result.history)
    layers = result.report["layers"]
    assert layers["backbone.body.layer2.0.conv1"][0] < layers["backbone.body.layer2.0.conv1"][1]
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    pruned.train()
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}
    losses = pruned([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    pruned.eval()
    path = tmp / f"{method}.pt"
    checkpoint.save(
        path,
        spec=ctx.spec,
        model=pruned,
        history=result.history,
        meta={},
        **{checkpoint.AUX_HEADS: result.aux_heads},
    )
    reloaded, _ = checkpoint.load_model(path)
    reloaded.eval()
    assert count_params(reloaded) == count_params(pruned)
    with torch.no_grad():
        a, b = pruned.backbone(image[None]), reloaded.backbone(image[None])
        da, db = pruned([image])[0], reloaded([image])[0]
    for key in a:
        assert torch.equal(a[key], b[key])
    for key in da:
        assert torch.equal(da[key], db[key])
    return result, path


def test_dcp_prunes_the_detector_to_the_flops_target(tmp_path: Path):
    result, _ = check_pruned_detector("dcp", tmp_path, FAST)
    dcp = result.report["dcp"]
    assert dcp["head"] == "dcp"
    assert dcp["aux_features"] == [
        "backbone.body.layer1",
        "backbone.body.layer2",
        "backbone.body.layer3",
    ]
    stages = {g["root"]: g["stage"] for g in dcp["groups"]}
    assert stages["backbone.body.layer1.0.conv1"] == 0
    assert stages["backbone.body.layer4.0.conv1"] == 3
    assert all(g["kept"] < g["channels"] for g in dcp["groups"])
    # the budget used, and per group its rounds and each consumer's scale
    assert dcp["budget"] == {
        "batches": 1,
        "images": 4,
        "select_steps": 2,
        "channels_per_round": None,
        "sgd_iters": 1,
        "aux_batches": 1,
        "aux_iters": 5,
        "recon_normalize": False,
    }
    for g in dcp["groups"]:
        assert g["per_round"] == -(-g["kept"] // 2) and g["rounds"] <= 2
        assert g["consumers"] and all(c["energy"] > 0 for c in g["consumers"])
    scales = [c["energy"] for g in dcp["groups"] for c in g["consumers"]]
    assert max(scales) / min(scales) > 10  # consumers of very different scales
    assert any(c["per_roi"] for g in dcp["groups"] for c in g["consumers"])
    assert sorted(result.aux_heads) == dcp["aux_features"]


def test_a_step_that_raises_the_loss_is_undone_and_the_lr_halved():
    gen = torch.Generator().manual_seed(2)
    x = 30.0 * torch.randn(4, 8, 8, 8, generator=gen)  # large activations, as after a neck
    teacher = torch.randn(6, 8, 3, 3, generator=gen)
    conv, consumer, loss_fn = _layer_and_loss(x, teacher, teacher + 0.1)
    keep = torch.ones(8, dtype=torch.bool)
    before = float(loss_fn(0).detach())
    opt = torch.optim.SGD([conv.weight], lr=0.01, momentum=0.9)  # DCP's layer lr
    loss = fit_selected([consumer], keep, loss_fn, 1, 12, opt)
    # the mean squared error's curvature is about 2 * 900 / 6 = 300 > 2 / lr: the guard
    # undoes the rising steps and halves the lr until a step descends
    assert opt.param_groups[0]["lr"] <= 0.01 / 4
    assert torch.isfinite(conv.weight).all()
    assert loss < before
    plain = nn.Conv2d(8, 6, 3, bias=False)
    with torch.no_grad():
        plain.weight.copy_(teacher + 0.1)
    target = nn.functional.conv2d(x, teacher)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        sgd.zero_grad()
        nn.functional.mse_loss(plain(x), target).backward()
        sgd.step()
    with torch.no_grad():
        assert float(nn.functional.mse_loss(plain(x), target)) > 1e3 * before  # unguarded diverges
