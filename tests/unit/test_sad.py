"""Spatial-attention distillation: the attention loss and the fine-tuning hook."""

import copy

import pytest
import torch
from torch import nn

from detprune.models import MODELS, build_model
from detprune.pruning.procedures.gcp import apply_plan, coupled_units, select_channels
from detprune.train import checkpoint
from detprune.train.distill import DISTILLERS
from detprune.train.sad import (
    DEFAULT_WEIGHTS,
    SAD_LOSSES,
    attention_loss,
    attention_map,
    sigmoid_kl,
)

NAME = "fasterrcnn_narrow_fpn"
SIZE = 64


def test_attention_map_and_loss_on_a_hand_case():
    t = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])  # F^2 mean = [4, 0, 0, 0] -> A = e1
    s = torch.tensor([[[[0.0, 3.0], [0.0, 0.0]]]])  # A = e2
    assert attention_map(t).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert attention_loss(t, s).item() == pytest.approx(0.5)  # (1 + 1) / 4 positions
    # channel mean of squares: [1, 1] and [1, -1] channels give A = [0.5] * 4
    u = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, -1.0], [-1.0, 1.0]]]]).transpose(0, 1)
    assert attention_map(u).tolist() == [[0.5, 0.5, 0.5, 0.5]]
    assert attention_loss(t, u).item() == pytest.approx((0.25 + 3 * 0.25) / 4)


def test_attention_loss_is_zero_for_identical_maps_and_channel_count_free():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 8, 5, 7, generator=gen)
    assert attention_loss(f, f).item() == 0.0
    # the same attention from 3x the channels (repeated), or 4x the scale: still 0
    assert attention_loss(f, f.repeat(1, 3, 1, 1)).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_loss(f, 4 * f).item() == pytest.approx(0.0, abs=1e-12)
    other = torch.randn(2, 3, 5, 7, generator=gen)  # a narrower, different student
    assert attention_loss(f, other).item() > 1e-4
    with pytest.raises(ValueError, match="spatial size"):
        attention_loss(f, torch.randn(2, 8, 5, 6))


def test_sigmoid_kl_is_zero_for_equal_logits_and_matches_a_hand_value():
    z = torch.tensor([0.3, -1.2, 2.0])
    assert sigmoid_kl(z, z, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    pt, ps = torch.sigmoid(torch.tensor(1.0)), torch.sigmoid(torch.tensor(0.0))
    kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
    assert sigmoid_kl(torch.tensor([2.0]), torch.tensor([0.0]), 2.0).item() == pytest.approx(
        4 * kl.item(), rel=1e-5
    )


@pytest.fixture(scope="module")
def teacher_student():
    """The unpruned detector (teacher) and a GCP-pruned copy (student), 64 px."""
    torch.manual_seed(0)
    spec = checkpoint.model_spec(NAME, 3, {"image_size": SIZE})
    teacher = build_model(NAME, 3, spec["kwargs"]).eval()
    inputs = (checkpoint.example_inputs(spec),)
    units = coupled_units(teacher, inputs, list(MODELS[NAME].ignored_layers), MODELS[NAME].groups)
    plan = select_channels(units, dict.fromkeys(MODELS[NAME].groups, 0.4), 4)
    student, _, _ = apply_plan(teacher, inputs, plan)
    return spec, teacher, student


def _batch():
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=gen) for _ in range(2)]
    box = torch.tensor([[4.0, 4.0, 40.0, 40.0]])
    return images, [{"boxes": box, "labels": torch.tensor([1])} for _ in images]


def test_sad_hook_adds_a_positive_loss_that_trains_only_the_student(teacher_student):
    spec, teacher, student = teacher_student
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    assert DISTILLERS["sad"] is SAD_LOSSES["sad"]
    hook = DISTILLERS["sad"](student, teacher, spec, {})
    stopped_early = []
    teacher.roi_heads.register_forward_hook(lambda *a: stopped_early.append(False))
    images, targets = _batch()
    student.train()
    losses = hook(student, images, targets, student(images, targets))
    assert set(losses) >= {"loss_sad", "loss_classifier", "loss_objectness"}
    sad = losses["loss_sad"]
    assert torch.isfinite(sad) and sad.item() > 0
    assert not stopped_early  # the teacher stops after its last tap (the FPN)
    sad.backward()
    assert student.backbone.body.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_sad_of_the_unpruned_model_against_itself_is_zero(teacher_student):
    spec, teacher, _ = teacher_student
    student = copy.deepcopy(teacher).eval()  # eval: same BN statistics as the teacher
    hook = SAD_LOSSES["sad"](student, copy.deepcopy(teacher), spec, {})
    images, targets = _batch()
    with torch.enable_grad():
        student.backbone(torch.rand(1, 3, SIZE, SIZE))  # a stray call is dropped
        out = student(images)
    losses = hook(student, images, targets, {"loss_det": torch.zeros(())})
    assert out and losses["loss_sad"].item() == pytest.approx(0.0, abs=1e-10)


def test_group_weights_and_output_distillation(teacher_student):
    spec, teacher, student = teacher_student
    images, targets = _batch()
    values = {}
    for name, opts in {
        "default": {},
        "neck_only": {"weights": {g: 0.0 for g in MODELS[NAME].groups if g != "neck"}},
        "doubled": {"weights": {g: 2 * DEFAULT_WEIGHTS[g] for g in MODELS[NAME].groups}},
        "output": {"output": True},
    }.items():
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        s.train()
        torch.manual_seed(0)
        values[name] = SAD_LOSSES["sad"](s, t, spec, opts)(s, images, targets, s(images, targets))
    base = values["default"]["loss_sad"].item()
    assert values["doubled"]["loss_sad"].item() == pytest.approx(2 * base, rel=1e-5)
    assert 0 < values["neck_only"]["loss_sad"].item() < base
    out = values["output"]
    assert out["loss_sad"].item() == pytest.approx(base, rel=1e-5)
    for key in ("loss_sad_kl", "loss_sad_box"):
        assert torch.isfinite(out[key]) and out[key].item() > 0
    assert "loss_sad_kl" not in values["default"]


def test_sad_needs_taps(monkeypatch):
    from detprune.models.base import ModelEntry

    monkeypatch.setitem(MODELS, "no-taps", ModelEntry(nn.Linear, "a model without taps"))
    m = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="declares no distill_taps"):
        SAD_LOSSES["sad"](m, m, {"name": "no-taps"}, {})
