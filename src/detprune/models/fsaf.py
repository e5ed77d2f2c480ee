"""FSAF (Zhu, He, Savvides, "Feature Selective Anchor-Free Module for Single-Shot Object
Detection", CVPR 2019): RetinaNet plus anchor-free branches with online feature selection.

On every pyramid level l (stride s_l) the anchor-free module adds a 3x3 conv with K
outputs on the classification tower (class heatmaps, sigmoid) and a 3x3 conv with 4
outputs on the box tower (ReLU: distances left, top, right, bottom of the box from the
pixel centre, in units of ``norm * s_l``). For an instance with box b, its projection
b / s_l is shrunk to the *effective* region (``eps_e = 0.2``) and the *ignoring*
region (``eps_i = 0.5``). Online feature selection: the instance is assigned to the
level with the smallest mean focal loss + mean IoU loss over its effective region.
There the effective region is positive for its class channel, the rest of the
ignoring region is ignored (also on the two adjacent levels); everything else is
negative. Smaller instances win overlapping effective regions. Losses: focal loss
over non-ignored pixels normalised by the number of effective pixels, and -ln(IoU)
averaged over effective pixels; the anchor-free loss is weighted by ``af_weight``
(lambda = 0.5). Inference merges the anchor-based and anchor-free candidates (score
> ``score_thresh``, top-k per level) before one NMS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetRegressionHead,
)
from torchvision.ops import batched_nms, box_area, clip_boxes_to_image, sigmoid_focal_loss

STRIDES = (8, 16, 32, 64, 128)


def tower_norm(groups: int | None) -> Callable[[int], nn.Module] | None:
    """The towers' norm layer: None (RetinaNet's plain conv + ReLU) or GroupNorm with
    ``groups`` groups (torchvision's RetinaNet v2 and FCOS put GN in their towers)."""
    if groups is None:
        return None
    if groups < 1:
        raise ValueError(f"model.head_norm_groups: {groups} must be >= 1 or null")
    return partial(nn.GroupNorm, groups)


def truncate_towers(head: nn.Module, num_convs: int) -> nn.Module:
    """Keep the first ``num_convs`` convs of each RetinaNet subnet tower (torchvision: 4)."""
    for sub in (head.classification_head, head.regression_head):
        if not 1 <= num_convs <= len(sub.conv):
            raise ValueError(f"model.head_convs: {num_convs} not in 1..{len(sub.conv)}")
        sub.conv = sub.conv[:num_convs]
    return head


class FSAFHead(nn.Module):
    """RetinaNet's towers and anchor-based outputs, plus FSAF's two anchor-free convs.

    All convs are shared across pyramid levels, as in RetinaNet.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        prior_probability: float = 0.01,
        norm_groups: int | None = None,
    ) -> None:
        super().__init__()
        norm = tower_norm(norm_groups)
        self.classification_head = RetinaNetClassificationHead(
            in_channels, num_anchors, num_classes, prior_probability, norm_layer=norm
        )
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, norm_layer=norm)
        truncate_towers(self, num_convs)
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.af_cls = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.af_reg = nn.Conv2d(in_channels, 4, 3, padding=1)
        nn.init.normal_(self.af_cls.weight, std=0.01)
        nn.init.constant_(self.af_cls.bias, -math.log((1 - prior_probability) / prior_probability))
        nn.init.normal_(self.af_reg.weight, std=0.01)
        # a positive bias keeps the ReLU of the distances alive at the start
        nn.init.constant_(self.af_reg.bias, 0.25)

    def forward(self, features: list[Tensor]) -> dict[str, Any]:
        cls_out, reg_out, af_cls, af_reg = [], [], [], []
        for f in features:
            ct = self.classification_head.conv(f)
            rt = self.regression_head.conv(f)
            logits = self.classification_head.cls_logits(ct)
            deltas = self.regression_head.bbox_reg(rt)
            n, _, h, w = logits.shape
            logits = logits.view(n, self.num_anchors, self.num_classes, h, w)
            cls_out.append(logits.permute(0, 3, 4, 1, 2).reshape(n, -1, self.num_classes))
            deltas = deltas.view(n, self.num_anchors, 4, h, w)
            reg_out.append(deltas.permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
            af_cls.append(self.af_cls(ct))
            af_reg.append(F.relu(self.af_reg(rt)))
        return {
            "cls_logits": torch.cat(cls_out, 1),
            "bbox_regression": torch.cat(reg_out, 1),
            "af_cls": af_cls,
            "af_reg": af_reg,
        }

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Any],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """RetinaNet's anchor-based focal and L1 losses (torchvision's subnets)."""
        return {
            "classification": self.classification_head.compute_loss(
                targets, head_outputs, matched_idxs
            ),
            "bbox_regression": self.regression_head.compute_loss(
                targets, head_outputs, anchors, matched_idxs
            ),
        }


def _pixel_span(lo: Tensor, hi: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Inclusive pixel index range whose centres (j + 0.5) lie in [lo, hi]; at least the
    pixel holding the middle of [lo, hi]; clipped to the feature map."""
    start, end = torch.ceil(lo - 0.5), torch.floor(hi - 0.5)
    mid = torch.floor((lo + hi) / 2)
    empty = end < start
    start, end = torch.where(empty, mid, start), torch.where(empty, mid, end)
    return start.clamp(0, size - 1).long(), end.clamp(0, size - 1).long()


def shrunk_regions(boxes: Tensor, stride: float, eps: float, height: int, width: int) -> Tensor:
    """Pixel bounds [M, 4] (x0, y0, x1, y1, inclusive) of the central ``eps`` part of
    ``boxes`` (xyxy, image coordinates) projected onto a level of ``stride``."""
    b = boxes / stride
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    hw, hh = eps * (b[:, 2] - b[:, 0]) / 2, eps * (b[:, 3] - b[:, 1]) / 2
    x0, x1 = _pixel_span(cx - hw, cx + hw, width)
    y0, y1 = _pixel_span(cy - hh, cy + hh, height)
    return torch.stack([x0, y0, x1, y1], 1)


def decode_distances(dist: Tensor, y0: int, x0: int, stride: float, norm: float) -> Tensor:
    """Boxes [h*w, 4] (xyxy) from distances [4, h, w] (l, t, r, b) of the pixels whose
    top-left is (y0, x0) at a level of ``stride``."""
    _, h, w = dist.shape
    ys = (torch.arange(h, device=dist.device, dtype=dist.dtype) + y0 + 0.5) * stride
    xs = (torch.arange(w, device=dist.device, dtype=dist.dtype) + x0 + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    d = dist * (norm * stride)
    boxes = torch.stack([cx - d[0], cy - d[1], cx + d[2], cy + d[3]], 0)
    return boxes.reshape(4, -1).t()


def paired_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (xyxy)."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    return inter / (box_area(a) + box_area(b) - inter).clamp(min=eps)


def iou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """UnitBox IoU loss -ln(IoU) per box pair (Yu et al., ACM MM 2016), as FSAF uses."""
    return -torch.log(paired_iou(pred, target).clamp(min=eps))


def instance_level_losses(
    af_cls: Sequence[Tensor],
    af_reg: Sequence[Tensor],
    boxes: Tensor,
    labels: Tensor,
    strides: Sequence[float],
    eps_e: float = 0.2,
    norm: float = 4.0,
) -> Tensor:
    """FSAF's selection criterion [M, L] for one image: the mean focal loss (summed over
    the K channels) plus the mean IoU loss over each instance's effective region.

    ``af_cls[l]`` is [K, H, W] (logits), ``af_reg[l]`` [4, H, W]; ``labels`` 0..K-1.
    """
    out = boxes.new_zeros((len(boxes), len(af_cls)))
    for lvl, (cls, reg, s) in enumerate(zip(af_cls, af_reg, strides, strict=True)):
        regions = shrunk_regions(boxes, s, eps_e, cls.shape[-2], cls.shape[-1]).tolist()
        for m, (x0, y0, x1, y1) in enumerate(regions):
            logits = cls[:, y0 : y1 + 1, x0 : x1 + 1]
            target = torch.zeros_like(logits)
            target[labels[m]] = 1.0
            focal = sigmoid_focal_loss(logits, target, reduction="none").sum(0).mean()
            pred = decode_distances(reg[:, y0 : y1 + 1, x0 : x1 + 1], y0, x0, s, norm)
            iou = iou_loss(pred, boxes[m].expand_as(pred)).mean()
            out[m, lvl] = focal + iou
    return out


def select_levels(level_losses: Tensor) -> Tensor:
    """Online feature selection: each instance goes to its level of smallest loss."""
    return level_losses.argmin(dim=1)


def anchor_free_loss(
    af_cls: Sequence[Tensor],
    af_reg: Sequence[Tensor],
    targets: Sequence[dict[str, Tensor]],
    strides: Sequence[float],
    eps_e: float = 0.2,
    eps_i: float = 0.5,
    norm: float = 4.0,
) -> dict[str, Tensor]:
    """FSAF's anchor-free focal and IoU losses over a batch (labels 0..K-1 in targets).

    ``af_cls[l]`` is [N, K, H, W], ``af_reg[l]`` [N, 4, H, W].
    """
    cls_sum = af_cls[0].new_zeros(())
    reg_sum = af_cls[0].new_zeros(())
    num_pos = 0
    for n, tgt in enumerate(targets):
        boxes, labels = tgt["boxes"], tgt["labels"]
        cls_n = [c[n] for c in af_cls]
        reg_n = [r[n] for r in af_reg]
        levels: list[int] = []
        if len(boxes):
            with torch.no_grad():
                crit = instance_level_losses(cls_n, reg_n, boxes, labels, strides, eps_e, norm)
            levels = select_levels(crit).tolist()
        order = torch.argsort(box_area(boxes), descending=True).tolist() if len(boxes) else []
        for lvl, (cls, reg, s) in enumerate(zip(cls_n, reg_n, strides, strict=True)):
            k, h, w = cls.shape
            target = torch.zeros_like(cls)
            valid = torch.ones_like(cls, dtype=torch.bool)
            box_t = cls.new_zeros((h, w, 4))
            pos = torch.zeros((h, w), dtype=torch.bool, device=cls.device)
            eff = shrunk_regions(boxes, s, eps_e, h, w).tolist()
            ign = shrunk_regions(boxes, s, eps_i, h, w).tolist()
            for m in order:  # ignoring regions, on the chosen and adjacent levels
                if abs(levels[m] - lvl) <= 1:
                    x0, y0, x1, y1 = ign[m]
                    valid[labels[m], y0 : y1 + 1, x0 : x1 + 1] = False
            for m in order:  # effective regions, larger first so smaller ones win
                if levels[m] != lvl:
                    continue
                x0, y0, x1, y1 = eff[m]
                target[:, y0 : y1 + 1, x0 : x1 + 1] = 0.0
                target[labels[m], y0 : y1 + 1, x0 : x1 + 1] = 1.0
                valid[:, y0 : y1 + 1, x0 : x1 + 1] = True
                box_t[y0 : y1 + 1, x0 : x1 + 1] = boxes[m]
                pos[y0 : y1 + 1, x0 : x1 + 1] = True
            focal = sigmoid_focal_loss(cls, target, reduction="none")
            cls_sum = cls_sum + focal[valid].sum()
            if pos.any():
                ys, xs = torch.nonzero(pos, as_tuple=True)
                d = reg[:, ys, xs] * (norm * s)
                cx, cy = (xs.to(d.dtype) + 0.5) * s, (ys.to(d.dtype) + 0.5) * s
                pred = torch.stack([cx - d[0], cy - d[1], cx + d[2], cy + d[3]], 1)
                reg_sum = reg_sum + iou_loss(pred, box_t[ys, xs]).sum()
                num_pos += int(pos.sum())
    denom = max(num_pos, 1)
    return {"af_classification": cls_sum / denom, "af_bbox_regression": reg_sum / denom}


class FSAF(RetinaNet):
    """RetinaNet with FSAF's anchor-free module; torchvision's detection API, labels 1..K.

    Heads have K channels (no background channel): labels are shifted to 0..K-1 inside.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        head: FSAFHead,
        af_weight: float = 0.5,
        strides: Sequence[int] = STRIDES,
        eps_e: float = 0.2,
        eps_i: float = 0.5,
        norm: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, head=head, **kwargs)
        self.af_weight = af_weight
        self.strides = tuple(strides)
        self.eps_e, self.eps_i, self.norm = eps_e, eps_i, norm

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if self.training and targets is None:
            raise ValueError("FSAF: targets are required in training mode")
        if targets is not None:
            targets = [{**t, "labels": t["labels"] - 1} for t in targets]
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        images_t, targets = self.transform(images, targets)
        features = list(self.backbone(images_t.tensors).values())
        if len(features) != len(self.strides):
            raise ValueError(f"FSAF: {len(features)} levels but strides {self.strides}")
        head_outputs = self.head(features)
        anchors = self.anchor_generator(images_t, features)
        if self.training:
            assert targets is not None
            losses = self.compute_loss(targets, head_outputs, anchors)
            af = anchor_free_loss(
                head_outputs["af_cls"],
                head_outputs["af_reg"],
                targets,
                self.strides,
                self.eps_e,
                self.eps_i,
                self.norm,
            )
            losses.update({k: self.af_weight * v for k, v in af.items()})
            return losses
        counts = [f.shape[-2] * f.shape[-1] * self.head.num_anchors for f in features]
        detections = self.merge_detections(head_outputs, anchors, counts, images_t.image_sizes)
        detections = self.transform.postprocess(detections, images_t.image_sizes, original_sizes)
        return [{**d, "labels": d["labels"] + 1} for d in detections]

    def _top(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """Scores above the threshold, at most ``topk_candidates``: (scores, flat indices)."""
        idx = torch.where(scores > self.score_thresh)[0]
        top, order = scores[idx].topk(min(self.topk_candidates, idx.numel()))
        return top, idx[order]

    def merge_detections(
        self,
        head_outputs: dict[str, Any],
        anchors: list[Tensor],
        counts: list[int],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Anchor-based and anchor-free candidates per level, merged, then one NMS."""
        k = self.head.num_classes
        cls_levels = head_outputs["cls_logits"].split(counts, 1)
        reg_levels = head_outputs["bbox_regression"].split(counts, 1)
        out = []
        for n, shape in enumerate(image_shapes):
            boxes, scores, labels = [], [], []
            anchor_levels = anchors[n].split(counts)
            for cls, reg, anc in zip(cls_levels, reg_levels, anchor_levels, strict=True):
                top, idx = self._top(torch.sigmoid(cls[n]).flatten())
                a = torch.div(idx, k, rounding_mode="floor")
                boxes.append(self.box_coder.decode_single(reg[n][a], anc[a]))
                scores.append(top)
                labels.append(idx % k)
            for cls, reg, s in zip(
                head_outputs["af_cls"], head_outputs["af_reg"], self.strides, strict=True
            ):
                _, h, w = cls[n].shape
                top, idx = self._top(torch.sigmoid(cls[n]).permute(1, 2, 0).flatten())
                pix = torch.div(idx, k, rounding_mode="floor")
                all_boxes = decode_distances(reg[n], 0, 0, s, self.norm)
                boxes.append(all_boxes[pix])
                scores.append(top)
                labels.append(idx % k)
            b = clip_boxes_to_image(torch.cat(boxes), shape)
            sc, lb = torch.cat(scores), torch.cat(labels)
            keep = batched_nms(b, sc, lb, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": b[keep], "scores": sc[keep], "labels": lb[keep]})
        return out
