"""GFL (Li et al., "Generalized Focal Loss", NeurIPS 2020): a ResNet-FPN (P3-P7) one-stage
detector with a shared head trained by Quality Focal Loss (joint class-IoU score),
Distribution Focal Loss on the integral box representation and GIoU, ATSS assignment.

Differences from mmdetection's ``gfl_r50_fpn_1x_coco``, by design:

- the head's norm is BatchNorm, one BN per pyramid level behind the convs that all levels
  share (as NAS-FPN/EfficientDet do), instead of GroupNorm(32): a BN channel is pruned with
  its conv by torch-pruning with no group-divisibility constraint, and per-level BN keeps
  train- and test-time statistics of the shared convs apart. ``head_norm="gn"`` gives the
  paper's GroupNorm (shared over levels);
- the backbone's BN is trained (not frozen), so that BN-scale criteria see real scales;
- anchors (one square of ``octave_base_scale`` strides per position, used by ATSS only)
  come from torchvision's AnchorGenerator, which spaces a level by image size // feature
  size: exact for inputs divisible by 128 (the CPU configuration), slightly off for P6/P7
  at 800x1333, as in torchvision's RetinaNet and FCOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, clip_boxes_to_image, generalized_box_iou_loss

from detprune.models.atss import atss_assign
from detprune.models.backbones import resnet_fpn_p3p7
from detprune.models.base import ModelEntry
from detprune.models.losses import (
    aligned_iou,
    distribution_focal_loss,
    integral,
    quality_focal_loss,
)

STRIDES = (8, 16, 32, 64, 128)


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(32, channels)


class GFLHead(nn.Module):
    """GFL's head: class and box towers of ``stacked_convs`` 3x3 convs shared by all levels.

    ``gfl_cls`` predicts per-class joint (class x IoU) logits, ``gfl_reg`` four discrete
    distributions of ``reg_max + 1`` bins (distances to the box sides, in strides); a
    learnable scalar per level scales the box logits (mmdetection's ``Scale``).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        reg_max: int = 16,
        norm: str = "bn",
    ) -> None:
        super().__init__()
        if norm not in ("bn", "gn"):
            raise ValueError(f"model.head_norm: expected 'bn' or 'gn', got {norm!r}")
        self.reg_max = reg_max
        chans = [in_channels] + [feat_channels] * stacked_convs
        self.cls_convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False)
            for i in range(stacked_convs)
        )
        self.reg_convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False)
            for i in range(stacked_convs)
        )
        sets = num_levels if norm == "bn" else 1
        self.cls_norms = nn.ModuleList(
            nn.ModuleList(_norm(norm, feat_channels) for _ in range(stacked_convs))
            for _ in range(sets)
        )
        self.reg_norms = nn.ModuleList(
            nn.ModuleList(_norm(norm, feat_channels) for _ in range(stacked_convs))
            for _ in range(sets)
        )
        self.gfl_cls = nn.Conv2d(chans[-1], num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(chans[-1], 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ParameterList(nn.Parameter(torch.tensor(1.0)) for _ in range(num_levels))
        for conv in [*self.cls_convs, *self.reg_convs, self.gfl_cls, self.gfl_reg]:
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(self.gfl_reg.bias)
        nn.init.constant_(self.gfl_cls.bias, -4.595)  # prior probability 0.01

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: class logits (B, K, H, W) and box logits (B, 4 (n + 1), H, W)."""
        cls_out, reg_out = [], []
        for level, x in enumerate(features):
            norms = min(level, len(self.cls_norms) - 1)
            c, r = x, x
            for conv, norm in zip(self.cls_convs, self.cls_norms[norms], strict=True):
                c = torch.relu(norm(conv(c)))
            for conv, norm in zip(self.reg_convs, self.reg_norms[norms], strict=True):
                r = torch.relu(norm(conv(r)))
            cls_out.append(self.gfl_cls(c))
            reg_out.append(self.gfl_reg(r) * self.scales[level])
        return cls_out, reg_out


def _flatten(outputs: list[Tensor], last: int) -> Tensor:
    """(B, C, H, W) per level -> (B, sum HW, C / last, last) row-major over (H, W)."""
    b = outputs[0].shape[0]
    return torch.cat([o.permute(0, 2, 3, 1).reshape(b, -1, o.shape[1]) for o in outputs], 1).view(
        b, -1, outputs[0].shape[1] // last, last
    )


class GFL(nn.Module):
    """GFL detector with torchvision's detection API (losses in train, detections in eval)."""

    def __init__(
        self,
        backbone: nn.Module,
        head: GFLHead,
        num_classes: int,
        *,
        min_size: int,
        max_size: int,
        octave_base_scale: float = 8.0,
        strides: Sequence[int] = STRIDES,
        atss_topk: int = 9,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        pre_nms_top_n: int = 1000,
        detections_per_img: int = 100,
        loss_weights: Sequence[float] = (1.0, 2.0, 0.25),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.strides = tuple(strides)
        sizes = tuple((int(octave_base_scale * s),) for s in self.strides)
        self.anchor_generator = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        )
        self.coder = BoxLinearCoder(normalize_by_size=False)
        self.atss_topk = atss_topk
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.pre_nms_top_n = pre_nms_top_n
        self.detections_per_img = detections_per_img
        self.w_qfl, self.w_giou, self.w_dfl = loss_weights

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("GFL: targets are required in train mode")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets = self.transform(images, targets)
        features = list(self.backbone(image_list.tensors).values())
        cls_out, reg_out = self.head(features)
        anchors = self.anchor_generator(image_list, features)
        level_sizes = [f.shape[-2] * f.shape[-1] for f in features]
        strides = torch.cat(
            [
                torch.full((n,), float(s), device=features[0].device)
                for n, s in zip(level_sizes, self.strides, strict=True)
            ]
        )
        cls_flat = _flatten(cls_out, self.num_classes).flatten(2)  # (B, A, K)
        reg_flat = _flatten(reg_out, self.head.reg_max + 1)  # (B, A, 4, n + 1)
        if self.training:
            assert targets is not None
            return self.compute_loss(cls_flat, reg_flat, anchors, strides, level_sizes, targets)
        dets = self.postprocess(cls_flat, reg_flat, anchors, strides, level_sizes, image_list)
        return self.transform.postprocess(dets, image_list.image_sizes, original_sizes)

    def compute_loss(
        self,
        cls_flat: Tensor,
        reg_flat: Tensor,
        anchors: list[Tensor],
        strides: Tensor,
        level_sizes: list[int],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """QFL over all anchors / #positives; GIoU and DFL over positives, weighted by the
        predicted score of each positive and normalised by the sum of these weights."""
        cls_targets, pos_pred, pos_gt, pos_dist, pos_tdist, pos_w = [], [], [], [], [], []
        for i, target in enumerate(targets):
            gt = target["boxes"]
            assigned = atss_assign(anchors[i], level_sizes, gt, self.atss_topk)
            pos = torch.nonzero(assigned >= 0).squeeze(1)
            quality = torch.zeros_like(cls_flat[i])
            if pos.numel():
                stride = strides[pos, None]
                dist_logits = reg_flat[i, pos]  # (P, 4, n + 1)
                boxes = self.coder.decode(integral(dist_logits) * stride, anchors[i][pos])
                gt_pos = gt[assigned[pos]]
                iou = aligned_iou(boxes.detach(), gt_pos).clamp(min=0)
                labels = target["labels"][assigned[pos]] - 1
                quality[pos, labels] = iou
                pos_pred.append(boxes)
                pos_gt.append(gt_pos)
                pos_dist.append(dist_logits)
                pos_tdist.append(self.coder.encode(anchors[i][pos], gt_pos) / stride)
                pos_w.append(cls_flat[i, pos].detach().sigmoid().max(dim=1).values)
            cls_targets.append(quality)
        num_pos = max(sum(len(w) for w in pos_w), 1)
        loss_qfl = quality_focal_loss(cls_flat, torch.stack(cls_targets)).sum() / num_pos
        if not pos_w:
            zero = reg_flat.sum() * 0.0
            return {"loss_qfl": self.w_qfl * loss_qfl, "loss_bbox": zero, "loss_dfl": zero}
        weight = torch.cat(pos_w)
        norm = weight.sum().clamp(min=1e-6)
        giou = generalized_box_iou_loss(torch.cat(pos_pred), torch.cat(pos_gt), reduction="none")
        dfl = distribution_focal_loss(torch.cat(pos_dist), torch.cat(pos_tdist)).mean(dim=1)
        return {
            "loss_qfl": self.w_qfl * loss_qfl,
            "loss_bbox": self.w_giou * (weight * giou).sum() / norm,
            "loss_dfl": self.w_dfl * (weight * dfl).sum() / norm,
        }

    def postprocess(
        self,
        cls_flat: Tensor,
        reg_flat: Tensor,
        anchors: list[Tensor],
        strides: Tensor,
        level_sizes: list[int],
        image_list: Any,
    ) -> list[dict[str, Tensor]]:
        """Per level the ``pre_nms_top_n`` best (anchor, class) scores above the threshold;
        class-wise NMS over all levels; the ``detections_per_img`` best survive."""
        results = []
        k = self.num_classes
        for i, size in enumerate(image_list.image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            start = 0
            for n in level_sizes:
                scores = cls_flat[i, start : start + n].sigmoid().flatten()
                keep = torch.nonzero(scores > self.score_thresh).squeeze(1)
                top = scores[keep].topk(min(self.pre_nms_top_n, keep.numel())).indices
                keep = keep[top]
                idx = keep // k + start
                dist = integral(reg_flat[i, idx]) * strides[idx, None]
                boxes_all.append(self.coder.decode(dist, anchors[i][idx]))
                scores_all.append(scores[keep])
                labels_all.append(keep % k + 1)
                start += n
            boxes = clip_boxes_to_image(torch.cat(boxes_all), size)
            scores, labels = torch.cat(scores_all), torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results


def build_gfl(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    image_size: int = 800,
    max_size: int | None = None,
    fpn_channels: int = 256,
    widths: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    stem_width: int = 16,
    feat_channels: int = 256,
    stacked_convs: int = 4,
    reg_max: int = 16,
    head_norm: str = "bn",
    octave_base_scale: float = 8.0,
    atss_topk: int = 9,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
    pre_nms_top_n: int = 1000,
    detections_per_img: int = 100,
    pretrained_backbone: str | None = None,
) -> GFL:
    """Build GFL for ``num_classes`` foreground classes; defaults are mmdetection's
    ``gfl_r50_fpn_1x_coco`` (800x1333, 4 stacked convs of 256, reg_max 16, top-9 ATSS,
    anchors 8x the stride, score 0.05, NMS 0.6, 100 detections)."""
    body = resnet_fpn_p3p7(
        backbone,
        fpn_channels,
        widths=widths,
        blocks=blocks,
        stem_width=stem_width,
        pretrained_backbone=pretrained_backbone,
    )
    head = GFLHead(
        fpn_channels, num_classes, len(STRIDES), feat_channels, stacked_convs, reg_max, head_norm
    )
    return GFL(
        body,
        head,
        num_classes,
        min_size=image_size,
        max_size=max_size or image_size,
        octave_base_scale=octave_base_scale,
        atss_topk=atss_topk,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        pre_nms_top_n=pre_nms_top_n,
        detections_per_img=detections_per_img,
    )


_GFL_PRUNING: dict[str, Any] = {
    "backbone_kind": "resnet",
    # the two prediction convs; everything else (FPN outputs and the shared towers
    # included: torch-pruning couples the five levels through the shared convs) is prunable
    "ignored_layers": ("head.gfl_cls", "head.gfl_reg"),
    "neck_outputs": ("backbone.fpn",),
    "cls_logits": ("head.gfl_cls",),
    "aux_features": (
        ("backbone.body.layer1", 4),
        ("backbone.body.layer2", 8),
        ("backbone.body.layer3", 16),
        ("backbone.body.layer4", 32),
    ),
    "groups": {
        "stride4": ("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"),
        "stride8": ("backbone.body.layer2",),
        "stride16": ("backbone.body.layer3",),
        "stride32": ("backbone.body.layer4",),
        "neck": ("backbone.fpn",),
        "head": ("head",),
    },
    "distill_taps": {
        "backbone.body.layer1": "stride4",
        "backbone.body.layer2": "stride8",
        "backbone.body.layer3": "stride16",
        "backbone.body.layer4": "stride32",
        "backbone.fpn": "neck",
    },
}

GFL_MODELS: dict[str, ModelEntry] = {
    "gfl_r50_fpn": ModelEntry(
        build_gfl,
        "GFL, ResNet-50-FPN P3-P7, 4x256 head convs, 800x1333: the MIEP paper's setting",
        {"backbone": "resnet50", "image_size": 800, "max_size": 1333},
        image_size=800,
        # mmdetection's 1x schedule (SGD lr 0.01 at batch 16, steps at epochs 8 and 11)
        schedule={
            "epochs": 12,
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 0.0001,
            "warmup_iters": 500,
            "schedule": "step",
            "milestones": [8, 11],
        },
        **_GFL_PRUNING,
    ),
    "gfl_narrow_fpn": ModelEntry(
        build_gfl,
        "GFL, narrow ResNet (32-256 ch) + 64-ch FPN P3-P7, 2x64 head convs, 128 px (CPU)",
        {
            "backbone": "narrow",
            "widths": (32, 64, 128, 256),
            "blocks": (1, 1, 1, 1),
            "stem_width": 32,
            "fpn_channels": 64,
            "feat_channels": 64,
            "stacked_convs": 2,
            "octave_base_scale": 4.0,
            "image_size": 128,
        },
        image_size=128,
        **_GFL_PRUNING,
    ),
}
