"""Adaptive Training Sample Selection (Zhang et al., "Bridging the Gap Between
Anchor-based and Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou


def atss_assign(
    anchors: Tensor,
    num_per_level: Sequence[int],
    gt_boxes: Tensor,
    topk: int = 9,
    inside_eps: float = 0.01,
) -> Tensor:
    """The ground truth each anchor learns from, -1 for background.

    ATSS, per ground-truth box g: on every pyramid level take the ``topk`` anchors whose
    centres are closest (L2) to g's centre as candidates; the IoU threshold is the mean
    plus the (unbiased) standard deviation of the candidates' IoUs with g; a candidate is
    positive when its IoU reaches the threshold and its centre lies inside g (more than
    ``inside_eps`` from every side). An anchor positive for several boxes takes the one
    it overlaps most.

    ``anchors`` (A, 4) xyxy, concatenated level by level with ``num_per_level`` anchors each;
    ``gt_boxes`` (G, 4) xyxy. Returns (A,) int64 indices into ``gt_boxes``.
    """
    num_anchors = anchors.shape[0]
    assigned = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if gt_boxes.numel() == 0 or num_anchors == 0:
        return assigned
    ious = box_iou(anchors, gt_boxes)  # (A, G)
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(a_ctr, g_ctr)  # (A, G)
    candidates = []
    start = 0
    for n in num_per_level:
        k = min(topk, n)
        if k > 0:
            idx = dist[start : start + n].topk(k, dim=0, largest=False).indices
            candidates.append(idx + start)
        start += n
    cand = torch.cat(candidates, dim=0)  # (C, G) anchor indices
    cand_iou = ious.gather(0, cand)  # (C, G)
    std = cand_iou.std(dim=0) if cand.shape[0] > 1 else torch.zeros_like(cand_iou[0])
    threshold = cand_iou.mean(dim=0) + std
    is_pos = cand_iou >= threshold[None]
    # the candidate's centre must lie inside its ground truth
    cx = a_ctr[cand, 0]
    cy = a_ctr[cand, 1]
    gap = torch.stack(
        (
            cx - gt_boxes[None, :, 0],
            cy - gt_boxes[None, :, 1],
            gt_boxes[None, :, 2] - cx,
            gt_boxes[None, :, 3] - cy,
        ),
        dim=-1,
    )
    is_pos &= gap.min(dim=-1).values > inside_eps
    # an anchor chosen by several boxes keeps the one of highest IoU
    masked = torch.full_like(ious, -1.0)
    gt_idx = torch.arange(gt_boxes.shape[0], device=anchors.device).expand_as(cand)
    masked[cand[is_pos], gt_idx[is_pos]] = ious[cand[is_pos], gt_idx[is_pos]]
    best_iou, best_gt = masked.max(dim=1)
    assigned[best_iou >= 0] = best_gt[best_iou >= 0]
    return assigned
