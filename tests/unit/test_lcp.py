"""LCP: enclosing boxes, contextual RoIAlign, GIoU regression, pruning and fine-tuning loss."""

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
from tests.unit.test_dcp import FAST, NAME, SIZE, check_pruned_detector


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


def test_lcp_finetuning_hook_adds_a_finite_positive_loss_and_trains_its_head():
    torch.manual_seed(0)
    spec = checkpoint.model_spec(NAME, 3, {"image_size": SIZE})
    model = build_model(NAME, 3, spec["kwargs"]).train()
    hook = DISTILLERS["lcp"](model, model, spec, {})
    images = [torch.rand(3, SIZE, SIZE) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    losses = hook(model, images, targets, model(images, targets))
    term = losses["loss_lcp_aux"]
    assert torch.isfinite(term) and float(term.detach()) > 0
    assert {"loss_classifier", "loss_objectness"} <= set(losses)
    term.backward()  # the model gets L_a's gradient through the deepest aux feature
    assert model.backbone.body.layer4[0].conv2.weight.grad.abs().sum() > 0
    head_weight = hook.head.cls.weight.detach().clone()
    assert hook.head.cls.weight.grad is not None
    model.zero_grad()
    hook(model, images, targets, model(images, targets))  # steps the head's own optimizer
    assert not torch.equal(hook.head.cls.weight.detach(), head_weight)
    assert hook.head.cls.weight.grad is None
    assert not any("lcp" in n for n, _ in model.named_parameters())


def test_lcp_prunes_the_detector_to_the_flops_target(tmp_path: Path):
    report = check_pruned_detector("lcp", tmp_path, {**FAST, "m": 1.0})
    assert report["dcp"]["head"] == "lcp"
    assert len(report["dcp"]["aux_loss_after_training"]) == 3
    assert all(v > 0 for v in report["dcp"]["aux_loss_after_training"])
