"""LCP: enclosing boxes, contextual RoIAlign, GIoU regression, pruning and fine-tuning loss."""

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from torchvision.ops import roi_align

from detprune.models import build_model
from detprune.pruning.importance.aux_net import (
    AuxHead,
    anchor_grid,
    aux_loss,
    contextual_roi_align,
    enclosing_boxes,
    giou_regression_loss,
    match_anchors,
)
from detprune.train import checkpoint
from detprune.train.distill import DISTILLERS
from detprune.train.engine import train_one_epoch
from tests.unit.test_dcp import FAST, NAME, SIZE, check_pruned_detector

LAYER3, LAYER4 = "backbone.body.layer3", "backbone.body.layer4"


def test_enclosing_box_is_the_smallest_box_containing_both():
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 50.0, 50.0], [0.0, 0.0, 4.0, 4.0]])
    a = torch.tensor([[25.0, 5.0, 50.0, 35.0], [10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 4.0, 4.0]])
    c = enclosing_boxes(b, a)
    assert c.tolist() == [[10, 5, 50, 40], [5, 5, 50, 50], [0, 0, 4, 4]]
    for box in (a, b):  # contains both ...
        assert bool((c[:, :2] <= box[:, :2]).all() and (c[:, 2:] >= box[:, 2:]).all())
    # ... and every side touches one of them, so no smaller box does
    sides = torch.stack([torch.minimum(a, b)[:, :2], torch.maximum(a, b)[:, 2:]], 1)
    assert torch.equal(c, sides.reshape(-1, 4))


def test_contextual_roi_align_is_the_sum_of_the_two_pools():
    # a ramp feature (value = x): one aligned bin averages x over the box, minus 0.5
    ramp = torch.arange(16.0).repeat(1, 1, 16, 1)
    b, c = torch.tensor([[2.0, 2.0, 6.0, 6.0]]), torch.tensor([[2.0, 2.0, 10.0, 6.0]])
    out = contextual_roi_align(ramp, [b], [c], 1, 1.0)
    assert out.flatten().tolist() == pytest.approx([3.5 + 5.5])
    feat = torch.randn(2, 5, 12, 12, generator=torch.Generator().manual_seed(0))
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 30.0]]), torch.tensor([[0.0, 4.0, 20.0, 44.0]])]
    ctx = [torch.tensor([[4.0, 8.0, 46.0, 40.0]]), torch.tensor([[0.0, 0.0, 30.0, 44.0]])]
    expect = roi_align(feat, boxes, 3, 0.25, 2, True) + roi_align(feat, ctx, 3, 0.25, 2, True)
    assert torch.equal(contextual_roi_align(feat, boxes, ctx, 3, 0.25), expect)
    # LCP's head classifies F_O of its projected feature; DCP's pools B alone
    torch.manual_seed(0)
    lcp = AuxHead(5, 3, 4, context=True, regress=True).eval()
    dcp = AuxHead(5, 3, 4, context=False, regress=False).eval()
    dcp.load_state_dict({k: v for k, v in lcp.state_dict().items() if not k.startswith("reg")})
    with torch.no_grad():
        x = lcp.proj(feat)
        logits, deltas = lcp(feat, boxes, ctx)
        assert torch.allclose(logits, lcp.cls(lcp.fc(contextual_roi_align(x, boxes, ctx, 3, 0.25))))
        plain, none = dcp(feat, boxes, ctx)
        assert torch.allclose(plain, dcp.cls(dcp.fc(roi_align(x, boxes, 3, 0.25, 2, True))))
    assert deltas is not None and deltas.shape == (2, 4) and none is None


def test_default_boxes_and_ssd_matching():
    anchors = anchor_grid(2, 2, 8, scales=(1.0,), ratios=(1.0,))
    assert anchors.tolist() == [[0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16]]
    assert anchor_grid(4, 3, 16).shape == (4 * 3 * 9, 4)
    gt = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 8.0, 14.0, 14.0]])
    matched, iou = match_anchors(anchors, gt)
    assert matched.tolist() == [0, -1, -1, 1]
    assert iou.tolist() == pytest.approx([1.0, 0.0, 0.0, 36 / 64])
    # a ground truth below the threshold still claims its best default box
    matched, iou = match_anchors(anchors, torch.tensor([[9.0, 9.0, 10.0, 10.0]]))
    assert matched.tolist() == [-1, -1, -1, 0] and iou[3] == pytest.approx(1 / 64)


def test_giou_regression_loss_weighted_by_m():
    gt = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert float(giou_regression_loss(gt, gt, 1.0)) == pytest.approx(0.0, abs=1e-6)
    far = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # IoU 0, hull 3, union 2: GIoU = -1/3
    assert float(giou_regression_loss(far, gt, 0.5)) == pytest.approx(0.5 * 4 / 3, abs=1e-6)


def test_aux_losses_of_lcp_and_dcp_heads():
    torch.manual_seed(0)
    feat = torch.randn(2, 8, 8, 8, requires_grad=True)
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 36.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
    ]
    lcp = AuxHead(8, 3, 8, context=True, regress=True)
    out = aux_loss(lcp, feat, targets, torch.Generator().manual_seed(0))
    assert set(out) == {"cls", "reg"}
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
    sum(out.values()).backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0
    zero_m = aux_loss(lcp, feat, targets, torch.Generator().manual_seed(0), m=0.0)
    assert float(zero_m["reg"].detach()) == 0.0
    dcp = AuxHead(8, 3, 8, context=False, regress=False)
    assert set(aux_loss(dcp, feat, targets, torch.Generator().manual_seed(0))) == {"cls"}


def _tiny_detector() -> tuple[dict, torch.nn.Module, list, list]:
    torch.manual_seed(0)
    spec = checkpoint.model_spec(NAME, 3, {"image_size": SIZE})
    model = build_model(NAME, 3, spec["kwargs"]).train()
    images = [torch.rand(3, SIZE, SIZE) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    return spec, model, images, targets


def test_lcp_finetuning_hook_adds_a_finite_positive_loss_and_the_engine_trains_its_head():
    spec, model, images, targets = _tiny_detector()
    hook = DISTILLERS["lcp"](model, model, spec, {})
    assert hook.path == LAYER4  # no trained head given: the deepest aux feature
    losses = hook(model, images, targets, model(images, targets))
    term = losses["loss_lcp_aux"]
    assert torch.isfinite(term) and float(term.detach()) > 0
    assert {"loss_classifier", "loss_objectness"} <= set(losses)
    term.backward()  # the model gets L_a's gradient through the aux feature
    assert model.backbone.body.layer4[0].conv2.weight.grad.abs().sum() > 0
    assert hook.optimizers() == [hook.optimizer]
    # one iteration of the engine: it steps the head's optimizer after the model's, on
    # this iteration's gradients (SGD's first step, lr 0.01, weight decay 1e-4)
    before = {n: p.detach().clone() for n, p in hook.head.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    cpu = torch.device("cpu")
    train_one_epoch(model, opt, sched, [(images, targets)], cpu, 0, loss_hook=hook)
    for n, p in hook.head.named_parameters():
        assert p.grad is not None, n
        expect = before[n] - 0.01 * (p.grad + 1e-4 * before[n])
        assert torch.allclose(p.detach(), expect, atol=1e-7), n
    assert not torch.equal(hook.head.cls.weight.detach(), before["cls.weight"])
    assert not any("lcp" in n for n, _ in model.named_parameters())
    hook.handle.remove()


def _layer3_head(model: torch.nn.Module, images: list, targets: list) -> dict:
    """A state_dict of an LCP head on layer3 of ``model``, all of its weights non-zero."""
    probe = DISTILLERS["lcp"](model, model, {"name": NAME, "num_classes": 3}, {"feature": LAYER3})
    probe(model, images, targets, model(images, targets))
    probe.handle.remove()
    torch.manual_seed(1)
    head = AuxHead(probe.head.proj[0].weight.shape[1], 3, 16, context=True, regress=True)
    torch.nn.init.normal_(head.reg.weight, std=0.01)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def test_lcp_starts_from_the_trained_head_when_it_fits_else_from_a_fresh_one(caplog):
    spec, model, images, targets = _tiny_detector()
    trained = _layer3_head(model, images, targets)

    def start(options: dict, heads: dict):
        hook = DISTILLERS["lcp"](model, model, spec, options, aux_heads=heads)
        hook(model, images, targets, model(images, targets))
        hook.handle.remove()
        same = all(torch.equal(p.detach(), trained[n]) for n, p in hook.head.named_parameters())
        return hook, same

    caplog.set_level(logging.INFO, logger="detprune.train.lcp")
    hook, same = start({}, {LAYER3: trained})
    assert (hook.path, hook.stride, hook.reused, same) == (LAYER3, 16, True, True)
    assert "starts from the auxiliary head trained on backbone.body.layer3" in caplog.text
    caplog.clear()
    no_reg = {k: v for k, v in trained.items() if not k.startswith("reg.")}  # a DCP head
    hook, same = start({}, {LAYER3: no_reg})
    assert (hook.path, hook.reused, same) == (LAYER3, False, False)
    assert "does not fit" in caplog.text and "missing reg.weight" in caplog.text
    caplog.clear()
    hook, same = start({"reuse_head": False}, {LAYER3: trained})  # the ablation
    assert (hook.path, hook.reused, same) == (LAYER3, False, False) and not caplog.text
    hook, _ = start({"feature": LAYER4}, {LAYER3: trained})
    assert (hook.path, hook.stride, hook.reused) == (LAYER4, 32, False)
    assert "carries no auxiliary head on backbone.body.layer4" in caplog.text
    with pytest.raises(ValueError, match="not one of the detector's aux_features"):
        DISTILLERS["lcp"](model, model, spec, {"feature": "backbone.fpn"})


def test_lcp_prunes_the_detector_and_finetuning_starts_from_its_trained_head(tmp_path: Path):
    result, path = check_pruned_detector("lcp", tmp_path, {**FAST, "m": 1.0})
    report = result.report
    assert report["dcp"]["head"] == "lcp"
    assert len(report["dcp"]["aux_loss_after_training"]) == 3
    assert all(v > 0 for v in report["dcp"]["aux_loss_after_training"])
    heads = checkpoint.aux_heads(checkpoint.load(path))  # read with weights_only=True
    assert sorted(heads) == report["dcp"]["aux_features"]
    for feature, state in result.aux_heads.items():
        assert all(torch.equal(heads[feature][k], v) for k, v in state.items())
    pruned, ckpt = checkpoint.load_model(path)
    pruned.train()
    hook = DISTILLERS["lcp"](pruned, pruned, ckpt["model"], {}, aux_heads=heads)
    assert hook.path == LAYER3  # the deepest head the pruning trained
    _, _, images, targets = _tiny_detector()
    losses = hook(pruned, images, targets, pruned(images, targets))
    assert torch.isfinite(losses["loss_lcp_aux"]) and hook.reused
    for n, p in hook.head.named_parameters():
        assert torch.equal(p.detach(), heads[LAYER3][n]), n


def test_the_prune_stage_saves_the_heads_and_the_finetune_stage_hands_them_on(
    monkeypatch, tiny_config, tmp_path: Path
):
    from detprune import stages
    from detprune.data.synth import write_synthetic
    from detprune.pruning.methods import METHODS, procedure_of

    write_synthetic(
        tmp_path / "d", seed=0, num_train=4, num_val=2, image_size=64, min_objects=1, max_objects=3
    )
    data = (str(tmp_path / "d/instances_train.json"), str(tmp_path / "d/train"))
    spec = checkpoint.model_spec(NAME, 6, {"image_size": 64})
    base = tmp_path / "base.pt"
    torch.manual_seed(0)
    checkpoint.save(
        base, spec=spec, model=build_model(NAME, 6, spec["kwargs"]), history=[], meta={}
    )
    heads = {LAYER3: {"proj.0.weight": torch.randn(64, 5, 1, 1)}}

    def l1_with_heads(ctx, method, target):
        l1 = METHODS["l1"]
        return dataclasses.replace(procedure_of(l1)(ctx, l1, target), aux_heads=heads)

    monkeypatch.setitem(
        METHODS, "lcp", dataclasses.replace(METHODS["lcp"], procedure=l1_with_heads)
    )
    pruned = tmp_path / "p.pt"
    stages.prune(tiny_config, "lcp", 0.5, str(base), *data, str(pruned), str(tmp_path / "p.json"))
    saved = checkpoint.aux_heads(checkpoint.load(pruned))
    assert torch.equal(saved[LAYER3]["proj.0.weight"], heads[LAYER3]["proj.0.weight"])
    seen = {}
    lcp = DISTILLERS["lcp"]

    def spy(student, teacher, spec, options, aux_heads=None):
        seen.update(aux_heads)
        return lcp(student, teacher, spec, options, aux_heads)

    monkeypatch.setitem(DISTILLERS, "lcp", spy)
    stages.finetune(tiny_config, "lcp", str(pruned), str(base), *data, str(tmp_path / "f.pt"))
    assert torch.equal(seen[LAYER3]["proj.0.weight"], heads[LAYER3]["proj.0.weight"])
    assert checkpoint.AUX_HEADS not in checkpoint.load(tmp_path / "f.pt")
