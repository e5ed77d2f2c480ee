"""QFL, DFL, the integral box and CIoU on hand-computed cases."""

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from detprune.models.losses import (
    aligned_iou,
    complete_iou,
    distribution_focal_loss,
    integral,
    quality_focal_loss,
)


def test_qfl_is_the_focal_loss_for_hard_targets():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, generator=gen) * 3
    hard = (torch.rand(50, 6, generator=gen) > 0.8).float()
    expected = sigmoid_focal_loss(logits, hard, alpha=-1, gamma=2.0, reduction="none")
    torch.testing.assert_close(quality_focal_loss(logits, hard, beta=2.0), expected)


def test_qfl_by_hand():
    # sigmoid(0) = 0.5: target 1 -> 0.5^2 * ln 2; target 0.5 -> |0.5 - 0.5|^2 = 0
    loss = quality_focal_loss(torch.zeros(3), torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([0.25 * math.log(2), 0.0, 0.25 * math.log(2)]))


def _logits(probs: list[float]) -> torch.Tensor:
    p = torch.tensor(probs)
    return torch.where(p > 0, p.clamp(min=1e-30).log(), torch.full_like(p, -1e9))


def test_dfl_is_minimal_on_the_two_bins_around_the_target():
    # y = 3.3 with 17 bins: optimum S_3 = 0.7, S_4 = 0.3, loss = entropy(0.7, 0.3)
    target = torch.tensor([3.3])
    best = [0.0] * 17
    best[3], best[4] = 0.7, 0.3
    loss = distribution_focal_loss(_logits(best)[None], target)
    expected = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert integral(_logits(best)).item() == pytest.approx(3.3, abs=1e-5)
    for other in ((3, 0.8, 4, 0.2), (3, 0.6, 4, 0.4), (3, 0.65, 4, 0.3, 5, 0.05)):
        probs = [0.0] * 17
        for i in range(0, len(other), 2):
            probs[other[i]] = other[i + 1]
        assert distribution_focal_loss(_logits(probs)[None], target).item() > loss.item() + 1e-3


def test_dfl_of_an_integer_target_is_cross_entropy_on_its_bin():
    logits = torch.zeros(1, 17)
    loss = distribution_focal_loss(logits, torch.tensor([5.0]))
    assert loss.item() == pytest.approx(math.log(17), abs=1e-5)
    assert integral(logits).item() == pytest.approx(8.0)


def test_ciou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 3)
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 4.0, 2.0]])
    ciou = complete_iou(a, b)
    # identical: CIoU 1, loss 0
    assert ciou[0].item() == pytest.approx(1.0, abs=1e-6)
    # same shape, shifted: IoU 1/7, centre distance^2 2, enclosing diagonal^2 18
    assert ciou[1].item() == pytest.approx(1 / 7 - 2 / 18, abs=1e-6)
    # IoU 1/2, rho^2 1, c^2 20, v = 4/pi^2 (atan 1 - atan 2)^2, alpha = v / (1/2 + v)
    v = 4 / math.pi**2 * (math.atan(1) - math.atan(2)) ** 2
    assert ciou[2].item() == pytest.approx(0.5 - 1 / 20 - v / (0.5 + v) * v, abs=1e-6)
    torch.testing.assert_close(aligned_iou(a, b), torch.tensor([1.0, 1 / 7, 0.5]))
