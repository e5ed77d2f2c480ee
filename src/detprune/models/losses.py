"""Detection losses the one-stage detectors share: QFL, DFL, the integral box, CIoU.

Quality and distribution focal losses are written from Li et al., "Generalized Focal
Loss: Learning Qualified and Distributed Bounding Boxes for Dense Object Detection"
(NeurIPS 2020); CIoU is torchvision's ``complete_box_iou_loss`` (Zheng et al., AAAI 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import complete_box_iou_loss


def quality_focal_loss(logits: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss (GFL, eq. 5), element-wise.

    ``QFL(s) = -|y - s|^beta * ((1 - y) log(1 - s) + y log s)`` with ``s = sigmoid(logits)``
    and the soft target ``y`` in [0, 1]: the IoU of the predicted box with its ground
    truth at the ground-truth class of a positive, 0 elsewhere. With ``y`` in {0, 1} this is
    the focal loss (Lin et al., ICCV 2017) with ``gamma = beta`` and no alpha weighting.
    """
    quality = quality.to(logits.dtype)
    scale = (quality - logits.sigmoid()).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, quality, reduction="none") * scale


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss (GFL, eq. 6), one value per distribution.

    ``DFL(S, y) = -((y_r - y) log S_l + (y - y_l) log S_r)`` with ``y_l = floor(y)``,
    ``y_r = y_l + 1`` and ``S = softmax(logits)`` over the ``n + 1`` bins 0..n: the
    cross-entropy towards the two bins around the continuous target ``y`` in [0, n), with
    the linear-interpolation weights. ``logits`` is (..., n + 1), ``target`` (...).
    """
    n = logits.shape[-1] - 1
    target = target.clamp(0, n - 0.01)
    left = target.floor().long()
    w_left = left.to(target.dtype) + 1 - target
    w_right = target - left.to(target.dtype)
    log_p = F.log_softmax(logits, dim=-1)
    lp_left = log_p.gather(-1, left.unsqueeze(-1)).squeeze(-1)
    lp_right = log_p.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1)
    return -(w_left * lp_left + w_right * lp_right)


def integral(logits: Tensor) -> Tensor:
    """GFL's integral box representation: ``y_hat = sum_i P(y_i) y_i`` over bins 0..n.

    ``logits`` is (..., n + 1); returns the expected bin (...), in units of the stride.
    """
    bins = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return F.softmax(logits, dim=-1) @ bins


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` (xyxy, (N, 4) each); returns (N,)."""
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area1 + area2 - inter + eps)


def complete_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """CIoU of ``boxes1[i]`` with ``boxes2[i]`` (xyxy): ``IoU - rho^2/c^2 - alpha v``.

    Zheng et al., "Distance-IoU Loss" (AAAI 2020), the box loss of YOLOv4 (Bochkovskiy et
    al., 2020): ``rho`` is the distance of the box centres, ``c`` the diagonal of the
    smallest enclosing box, ``v = 4/pi^2 (atan(w_gt/h_gt) - atan(w/h))^2`` the aspect-ratio
    term, ``alpha = v / (1 - IoU + v)``. Computed as ``1 - complete_box_iou_loss``.
    """
    return 1.0 - complete_box_iou_loss(boxes1, boxes2, reduction="none", eps=eps)
