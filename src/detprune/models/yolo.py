"""YOLOv4 (CSPDarknet53, SPP, PANet, three YOLO heads) and YOLOv4-tiny (two heads), with
torchvision's detection API: a letterbox transform, per-scale best-anchor assignment,
objectness/class BCE and CIoU box loss in train mode; decoding and class-wise NMS in eval.

Bochkovskiy et al., "YOLOv4: Optimal Speed and Accuracy of Object Detection" (2020); the
graph follows darknet's ``yolov4.cfg`` / ``yolov4-tiny.cfg`` (see :mod:`darknet`).

Each head's prediction conv outputs ``A * (5 + K)`` channels, anchor-major: for anchor
``a`` the channels ``a (5 + K) + [0:4]`` are the box (tx, ty, tw, th), ``+ 4`` the
objectness, ``+ 5 : (a + 1)(5 + K)`` the K class logits (see :func:`split_prediction`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from detprune.models.backbones import load_backbone_state
from detprune.models.base import ModelEntry
from detprune.models.darknet import (
    YOLOV4_GROUPS,
    CSPDarknet53,
    CSPDarknetTiny,
    TinyNeck,
    YOLOHead,
    YOLOv4Neck,
    init_neck_,
    scaled,
)
from detprune.models.losses import complete_iou

# yolov4.cfg (608 px) and yolov4-tiny.cfg (416 px) anchors, in pixels at that input size
YOLOV4_ANCHORS = ((12, 16), (19, 36), (40, 28), (36, 75), (76, 55), (72, 146), (142, 110),
                  (192, 243), (459, 401))  # fmt: skip
YOLOV4_MASKS = ((0, 1, 2), (3, 4, 5), (6, 7, 8))
TINY_ANCHORS = ((10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319))
TINY_MASKS = ((1, 2, 3), (3, 4, 5))  # darknet's tiny leaves anchor 0 unused


def split_prediction(out: Tensor, num_anchors: int) -> Tensor:
    """A head conv's output (B, A (5 + K), H, W) as (B, A, H, W, 5 + K): [..., 0:4] box,
    [..., 4] objectness, [..., 5:] class logits."""
    b, c, h, w = out.shape
    return out.view(b, num_anchors, c // num_anchors, h, w).permute(0, 1, 3, 4, 2)


def target_rows(targets: list[dict[str, Tensor]], device: torch.device) -> Tensor:
    """A batch's ground truth as (N, 6) rows: image index, class 0..K-1 (label - 1), xyxy."""
    return torch.cat(
        [
            torch.cat(
                (
                    torch.full((len(t["labels"]), 1), float(i), device=device),
                    (t["labels"].to(device).float() - 1)[:, None],
                    t["boxes"].to(device).float(),
                ),
                1,
            )
            for i, t in enumerate(targets)
        ]
    )


class Letterbox(nn.Module):
    """Resize keeping the aspect ratio so the longer side is ``size``, pad to a square with
    grey (0.5), as darknet's letterbox; map boxes there and back."""

    def __init__(self, size: int, fill: float = 0.5) -> None:
        super().__init__()
        self.size = size
        self.fill = fill

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[dict[str, Tensor]] | None, list[tuple[float, int, int, int, int]]]:
        s = self.size
        batch = images[0].new_full((len(images), 3, s, s), self.fill)
        metas, out_targets = [], []
        for i, im in enumerate(images):
            h, w = int(im.shape[-2]), int(im.shape[-1])
            r = s / max(h, w)
            nh, nw = min(s, round(h * r)), min(s, round(w * r))
            if (nh, nw) != (h, w):
                im = F.interpolate(im[None], (nh, nw), mode="bilinear", align_corners=False)[0]
            top, left = (s - nh) // 2, (s - nw) // 2
            batch[i, :, top : top + nh, left : left + nw] = im
            metas.append((r, left, top, h, w))
            if targets is not None:
                shift = torch.tensor([left, top, left, top], dtype=torch.float32)
                t = dict(targets[i])
                t["boxes"] = targets[i]["boxes"] * r + shift.to(targets[i]["boxes"].device)
                out_targets.append(t)
        return batch, (out_targets if targets is not None else None), metas

    def postprocess(
        self, dets: list[dict[str, Tensor]], metas: list[tuple[float, int, int, int, int]]
    ) -> list[dict[str, Tensor]]:
        """Boxes back to the original image coordinates, clipped to the image."""
        for det, (r, left, top, h, w) in zip(dets, metas, strict=True):
            shift = det["boxes"].new_tensor([left, top, left, top])
            det["boxes"] = clip_boxes_to_image((det["boxes"] - shift) / r, (h, w))
        return dets


class YOLO(nn.Module):
    """A YOLO detector: ``backbone`` -> ``neck`` -> ``head``, one anchor set per scale.

    Loss gains (box 0.05, objectness 1.0, classes 0.5) and the per-scale objectness
    balance (4.0, 1.0, 0.4 from stride 8) are ultralytics YOLOv5's; the terms are means,
    not multiplied by the batch size. Test time: objectness x class score above 0.001,
    NMS at IoU 0.6, 100 detections (the usual mAP-evaluation settings).
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        head: YOLOHead,
        num_classes: int,
        *,
        image_size: int,
        anchors: Sequence[Sequence[float]],
        masks: Sequence[Sequence[int]],
        strides: Sequence[int],
        scale_xy: Sequence[float],
        iou_t: float = 0.213,
        gains: Sequence[float] = (0.05, 1.0, 0.5),
        obj_balance: Sequence[float] = (4.0, 1.0, 0.4),
        obj_iou_ratio: float = 0.0,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.6,
        pre_nms_top_n: int = 3000,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        self.transform = Letterbox(image_size)
        self.backbone, self.neck, self.head = backbone, neck, head
        self.num_classes = num_classes
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), False)
        self.masks = [tuple(m) for m in masks]
        self.used = sorted({a for m in masks for a in m})
        self.strides = tuple(strides)
        self.scale_xy = tuple(scale_xy)
        self.iou_t = iou_t
        self.box_gain, self.obj_gain, self.cls_gain = gains
        self.obj_iou_ratio = obj_iou_ratio
        self.obj_balance = tuple(obj_balance)
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.pre_nms_top_n, self.detections_per_img = pre_nms_top_n, detections_per_img
        self._init_biases()

    def _init_biases(self) -> None:
        """Objectness prior of 8 objects per 640x640 image, class prior 0.6/K (YOLOv5's
        initialisation, Jocher et al.), so that training starts from calibrated scores."""
        k = self.num_classes
        for pred, stride, mask in zip(self.head.preds, self.strides, self.masks, strict=True):
            bias = pred.bias.detach().view(len(mask), -1)
            bias[:, 4] = math.log(8 / (640 / stride) ** 2)
            bias[:, 5:] = math.log(0.6 / max(k - 0.99, 0.01))

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("YOLO: targets are required in train mode")
        x, targets, metas = self.transform(images, targets)
        outs = self.head(self.neck(self.backbone(x)))
        preds = [split_prediction(o, len(m)) for o, m in zip(outs, self.masks, strict=True)]
        if self.training:
            assert targets is not None
            return self.compute_loss(preds, targets)
        return self.transform.postprocess(self.postprocess(preds), metas)

    def _decode(self, t: Tensor, grid: Tensor, anchors: Tensor, level: int) -> Tensor:
        """Raw (..., 4) outputs at cells ``grid`` (..., 2) with ``anchors`` (..., 2) -> xyxy:
        centre ``(s sigmoid(t_xy) - (s - 1)/2 + cell) stride``, size ``anchor exp(t_wh)``."""
        s = self.scale_xy[level]
        xy = (t[..., :2].sigmoid() * s - (s - 1) / 2 + grid) * self.strides[level]
        wh = t[..., 2:4].clamp(max=math.log(1e3)).exp() * anchors
        return torch.cat((xy - wh / 2, xy + wh / 2), -1)

    def build_targets(
        self, level: int, gt: Tensor, shape: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Which anchors of this scale learn which ground truth (``gt``: (N, 6) rows of
        image index, label 0..K-1, xyxy box in input pixels).

        Per ground truth the anchor of this scale with the best width-height IoU is kept
        if that IoU exceeds ``iou_t`` (the public ultralytics YOLOv3/v4 code the GCP
        paper builds on), and always when it is the best of all the detector's anchors
        (darknet), so that every box is learnt somewhere. The cell is the one holding the
        box centre. Returns (image, anchor, cell y, cell x) indices and kept ``gt`` rows.
        """
        mask = self.masks[level]
        wh = (gt[:, 4:6] - gt[:, 2:4]).clamp(min=1e-6)

        def wh_iou(anchors: Tensor) -> Tensor:
            inter = torch.minimum(wh[:, None], anchors[None]).prod(-1)
            return inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)

        iou, a = wh_iou(self.anchors[list(mask)]).max(dim=1)
        best_all = torch.tensor(self.used, device=gt.device)[
            wh_iou(self.anchors[self.used]).argmax(dim=1)
        ]
        keep = (iou > self.iou_t) | (torch.tensor(mask, device=gt.device)[a] == best_all)
        gt, a = gt[keep], a[keep]
        ctr = (gt[:, 2:4] + gt[:, 4:6]) / 2 / self.strides[level]
        gi = ctr[:, 0].long().clamp(0, shape[1] - 1)
        gj = ctr[:, 1].long().clamp(0, shape[0] - 1)
        return gt[:, 0].long(), a, gj, gi, gt

    def compute_loss(
        self, preds: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """CIoU box loss and class BCE over the assigned anchors, objectness BCE over all
        cells; per-scale means, objectness weighted per scale by ``obj_balance``, each term
        by its gain. A positive's objectness target is ``1 - r + r CIoU`` (CIoU detached,
        clamped at 0) with ``r = obj_iou_ratio``: 0 is darknet's target 1, 1 YOLOv5's."""
        device = preds[0].device
        gt = target_rows(targets, device)
        zero = preds[0].sum() * 0.0
        lbox, lobj, lcls = zero, zero, zero
        for level, p in enumerate(preds):
            tobj = torch.zeros_like(p[..., 4])
            b, a, gj, gi, tgt = self.build_targets(level, gt, (p.shape[2], p.shape[3]))
            if len(b):
                ps = p[b, a, gj, gi]
                anchors = self.anchors[list(self.masks[level])][a]
                grid = torch.stack((gi, gj), 1).to(ps.dtype)
                ciou = complete_iou(self._decode(ps[:, :4], grid, anchors, level), tgt[:, 2:6])
                lbox = lbox + (1.0 - ciou).mean()
                quality = ciou.detach().clamp(min=0)
                r = self.obj_iou_ratio
                tobj[b, a, gj, gi] = (1.0 - r + r * quality).to(tobj.dtype)
                onehot = torch.zeros_like(ps[:, 5:])
                onehot[torch.arange(len(b), device=device), tgt[:, 1].long()] = 1.0
                lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], onehot)
            lobj = lobj + self.obj_balance[level] * F.binary_cross_entropy_with_logits(
                p[..., 4], tobj
            )
        return {
            "loss_box": self.box_gain * lbox,
            "loss_obj": self.obj_gain * lobj,
            "loss_cls": self.cls_gain * lcls,
        }

    def postprocess(self, preds: list[Tensor]) -> list[dict[str, Tensor]]:
        """Score = objectness x class probability per (box, class); the ``pre_nms_top_n``
        best above ``score_thresh``; class-wise NMS; the ``detections_per_img`` best."""
        results = []
        k = self.num_classes
        for i in range(preds[0].shape[0]):
            boxes_all, scores_all = [], []
            for level, p in enumerate(preds):
                _, h, w, _ = p[i].shape
                ys, xs = torch.meshgrid(
                    torch.arange(h, device=p.device),
                    torch.arange(w, device=p.device),
                    indexing="ij",
                )
                grid = torch.stack((xs, ys), -1).to(p.dtype)[None]
                anchors = self.anchors[list(self.masks[level])][:, None, None]
                boxes_all.append(self._decode(p[i, ..., :4], grid, anchors, level).reshape(-1, 4))
                obj = p[i, ..., 4:5].sigmoid() * p[i, ..., 5:].sigmoid()
                scores_all.append(obj.reshape(-1, k))
            boxes, scores = torch.cat(boxes_all), torch.cat(scores_all).flatten()
            keep = torch.nonzero(scores > self.score_thresh).squeeze(1)
            keep = keep[scores[keep].topk(min(self.pre_nms_top_n, keep.numel())).indices]
            boxes, scores, labels = boxes[keep // k], scores[keep], keep % k + 1
            nms = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[nms], "scores": scores[nms], "labels": labels[nms]})
        return results


def build_yolov4(
    num_classes: int,
    *,
    image_size: int = 416,
    width: float = 1.0,
    depth: float = 1.0,
    anchor_scale: float = 1.0,
    iou_t: float = 0.213,
    gains: Sequence[float] = (0.05, 1.0, 0.5),
    obj_iou_ratio: float = 0.0,
    score_thresh: float = 0.001,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
    identity_init: float | None = None,
    neck_bn_bias: float = 0.0,
    pretrained_backbone: str | None = None,
) -> YOLO:
    """YOLOv4 (``yolov4.cfg``) for ``num_classes`` classes at ``image_size``; ``width`` and
    ``depth`` multiply channel and residual-block counts; anchors are yolov4.cfg's
    (608 px) scaled by ``image_size / 608 * anchor_scale``; grid sensitivity 1.2 / 1.1 /
    1.05; ``iou_t``: darknet's ``iou_thresh`` (see :meth:`YOLO.build_targets`);
    ``identity_init`` and ``neck_bn_bias``: how SPP + PANet start (:func:`init_neck_`;
    the defaults are PyTorch's initialisation); ``pretrained_backbone``: a local
    state_dict file of the :class:`CSPDarknet53` (loaded strictly)."""
    f = image_size / 608 * anchor_scale
    backbone = CSPDarknet53(width, depth)
    load_backbone_state(backbone, pretrained_backbone)
    neck = YOLOv4Neck(backbone.out_channels)
    head = YOLOHead(neck.out_channels, [2 * c for c in neck.out_channels], 3 * (5 + num_classes))
    init_neck_(neck, head, identity_init, neck_bn_bias)
    return YOLO(
        backbone,
        neck,
        head,
        num_classes,
        image_size=image_size,
        anchors=[(w * f, h * f) for w, h in YOLOV4_ANCHORS],
        masks=YOLOV4_MASKS,
        strides=(8, 16, 32),
        scale_xy=(1.2, 1.1, 1.05),
        iou_t=iou_t,
        gains=gains,
        obj_iou_ratio=obj_iou_ratio,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
    )


def build_yolov4_tiny(
    num_classes: int,
    *,
    image_size: int = 416,
    width: float = 1.0,
    anchor_scale: float = 1.0,
    iou_t: float = 0.213,
    gains: Sequence[float] = (0.05, 1.0, 0.5),
    obj_iou_ratio: float = 0.0,
    score_thresh: float = 0.001,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
    pretrained_backbone: str | None = None,
) -> YOLO:
    """YOLOv4-tiny (``yolov4-tiny.cfg``); anchors scaled by ``image_size / 416 *
    anchor_scale``; grid sensitivity 1.05; otherwise as :func:`build_yolov4`."""
    f = image_size / 416 * anchor_scale
    backbone = CSPDarknetTiny(width)
    load_backbone_state(backbone, pretrained_backbone)
    neck = TinyNeck(backbone.out_channels)
    mids = [scaled(256, width), scaled(512, width)]
    head = YOLOHead(neck.out_channels, mids, 3 * (5 + num_classes))
    return YOLO(
        backbone,
        neck,
        head,
        num_classes,
        image_size=image_size,
        anchors=[(w * f, h * f) for w, h in TINY_ANCHORS],
        masks=TINY_MASKS,
        strides=(16, 32),
        scale_xy=(1.05, 1.05),
        iou_t=iou_t,
        gains=gains,
        obj_iou_ratio=obj_iou_ratio,
        obj_balance=(1.0, 0.4),
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
    )


# ultralytics' SGD defaults (lr 0.01, momentum 0.937, weight decay 5e-4, cosine), the
# training code family the GCP+SAD paper's public code comes from
_PAPER_SCHEDULE = {"lr": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "schedule": "cosine"}

_V4: dict[str, Any] = {
    "backbone_kind": "cspdarknet53",
    "ignored_layers": ("head.preds.0", "head.preds.1", "head.preds.2"),
    "neck_outputs": ("neck",),
    # obj + class + box per anchor: the class logits are channels a(5+K)+5 : (a+1)(5+K)
    "cls_logits": ("head.preds.0", "head.preds.1", "head.preds.2"),
    "aux_features": (
        ("backbone.stages.1", 4),
        ("backbone.stages.2", 8),
        ("backbone.stages.3", 16),
        ("backbone.stages.4", 32),
    ),
    "groups": YOLOV4_GROUPS,
    "distill_taps": {
        "backbone.stages.2": "backbone_early",
        "backbone.stages.3": "backbone_late",
        "neck.spp": "spp",
        "neck.topdown.block3": "pan",
        "neck.bottomup.block4": "heads",
        "neck.bottomup.block5": "heads",
    },
}

_TINY: dict[str, Any] = {
    "backbone_kind": "cspdarknet53_tiny",
    "ignored_layers": ("head.preds.0", "head.preds.1"),
    "neck_outputs": ("neck",),
    "cls_logits": ("head.preds.0", "head.preds.1"),
    "aux_features": (
        ("backbone.blocks.0.fuse", 4),
        ("backbone.blocks.1.fuse", 8),
        ("backbone.blocks.2.fuse", 16),
        ("backbone.final", 32),
    ),
    "groups": {
        "backbone_early": ("backbone.stem0", "backbone.stem1", "backbone.blocks.0"),
        "backbone_late": ("backbone.blocks.1", "backbone.blocks.2", "backbone.final"),
        "neck": ("neck",),
        "heads": ("head",),
    },
    "distill_taps": {
        "backbone.blocks.1.fuse": "backbone_early",
        "backbone.blocks.2.fuse": "backbone_late",
        "backbone.final": "backbone_late",
        "neck.reduce": "neck",
    },
}

# CPU configurations: loss gains 4x YOLOv5's, chosen on the default synthetic set's val split
# (the split every figure was scored on before the test split existed; YOLOv4-tiny
# narrow, 6 epochs: 5.1 mAP against 3.7 with YOLOv5's gains; the engine averages the losses
# over its batch of 8 where YOLOv5 multiplies them by the batch size)
_CPU_GAINS = (0.2, 4.0, 2.0)

# How the CPU configuration of YOLOv4 starts (benchmarks/yolov4_narrow_training.md). The
# synthetic set's objects are large for a 128 px image (median 45 px): with yolov4.cfg's
# anchors scaled to 128 px no box has its best anchor at stride 8 and 84 % at stride 32;
# x2 spreads them 17 / 21 / 63 %. SPP + PANet start as a near-linear pass-through of the
# backbone (init_neck_): from PyTorch's initialisation the ~12 plain conv-BN-leaky layers
# between the backbone and each head never learn the classes in the CPU schedule (0.5 mAP).
_NARROW_V4_START = {"anchor_scale": 2.0, "identity_init": 0.1, "neck_bn_bias": 3.0}

YOLO_MODELS: dict[str, ModelEntry] = {
    "yolov4_416": ModelEntry(
        build_yolov4,
        "YOLOv4, CSPDarknet53 + SPP + PANet, 416 px: the GCP+SAD paper's setting",
        {"image_size": 416},
        image_size=416,
        schedule=_PAPER_SCHEDULE,
        **_V4,
    ),
    "yolov4_narrow": ModelEntry(
        build_yolov4,
        "YOLOv4 graph at width 0.25, depth 0.34 (blocks 1-1-3-3-1), 128 px, anchors x2, "
        "pass-through neck initialisation (CPU)",
        {
            "image_size": 128,
            "width": 0.25,
            "depth": 0.34,
            "gains": _CPU_GAINS,
            **_NARROW_V4_START,
        },
        image_size=128,
        **_V4,
    ),
    "yolov4_tiny": ModelEntry(
        build_yolov4_tiny,
        "YOLOv4-tiny, CSPDarknet53-tiny, two heads, 416 px",
        {"image_size": 416},
        image_size=416,
        schedule=_PAPER_SCHEDULE,
        **_TINY,
    ),
    "yolov4_tiny_narrow": ModelEntry(
        build_yolov4_tiny,
        "YOLOv4-tiny graph at width 0.5, 128 px (CPU)",
        {"image_size": 128, "width": 0.5, "gains": _CPU_GAINS},
        image_size=128,
        **_TINY,
    ),
}
