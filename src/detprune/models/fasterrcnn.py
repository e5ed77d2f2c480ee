"""Faster R-CNN with FPN (torchvision), prunable backbone, neck and heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import roi_align

from detprune.models.backbones import resnet_fpn
from detprune.models.base import ModelEntry

# Layers whose output channels no method may prune: the final predictions (classes and
# box coordinates).
FASTERRCNN_IGNORED = (
    "rpn.head.cls_logits",
    "rpn.head.bbox_pred",
    "roi_heads.box_predictor.cls_score",
    "roi_heads.box_predictor.bbox_pred",
)


def reference_boxes(h: float, w: float) -> torch.Tensor:
    """The two boxes the box head sees in the dense forward of an ``h`` x ``w`` input:
    the top-left quarter and the centred quarter (same area, so the same FPN level)."""
    return torch.tensor([[0.0, 0.0, w / 2, h / 2], [w / 4, h / 4, 3 * w / 4, 3 * h / 4]])


class PrunableFasterRCNN(FasterRCNN):
    """torchvision's Faster R-CNN with a dense forward for dependency tracing.

    In eval mode the RPN's proposals are detached (selected by index), so tracing the
    detections never reaches the RPN head and torch-pruning would not see that the FPN
    output channels feed it. Called with a batched tensor instead of a list of images,
    the model returns every head output on every level, so the traced graph holds all
    couplings: FPN outputs -> RPN head (shared over levels) and -> RoIAlign -> box head.

    The box head sees two reference boxes of one area (:func:`reference_boxes`), so both
    fall on one FPN level at any input size. (Boxes on two levels make torchvision's
    MultiScaleRoIAlign write two index_put results into one tensor; torch-pruning then
    chains two 7 x 7 flatten mappings, 256 x 49 x 49 channel indices, and building the
    pruning groups of an R50-FPN traced at 800 px ran out of 23 GB of memory.)
    """

    def forward(self, images, targets=None):  # type: ignore[override]
        if isinstance(images, torch.Tensor):
            return self.trace_forward(images)
        return super().forward(images, targets)

    def trace_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Dense outputs of every head for a batch ``x`` (B, 3, H, W); no NMS, no decoding."""
        features = self.backbone(x)
        objectness, deltas = self.rpn.head(list(features.values()))
        h, w = x.shape[-2:]
        boxes = reference_boxes(h, w).to(x)
        pooled = self.roi_heads.box_roi_pool(features, [boxes] * x.shape[0], [(h, w)] * x.shape[0])
        scores, reg = self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))
        return (*objectness, *deltas, scores, reg)

    def export_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`trace_forward`'s outputs, written so that the batch size stays symbolic
        when traced for ONNX export (``[boxes] * B`` would freeze it).

        The two reference boxes are fixed, so their FPN levels are too: each is pooled
        with RoIAlign on its level for every image, in ``trace_forward``'s order (image
        major). Runs :meth:`trace_forward` first if the pooler's scales are not set up.
        """
        pool = self.roi_heads.box_roi_pool
        h, w = x.shape[-2:]
        if pool.scales is None or pool.map_levels is None:
            self.trace_forward(x[:1])
        features = self.backbone(x)
        objectness, deltas = self.rpn.head(list(features.values()))
        ref = reference_boxes(h, w)
        levels = [int(v) for v in pool.map_levels([ref])]
        maps = [features[k] for k in pool.featmap_names]
        index = torch.arange(x.shape[0], dtype=x.dtype, device=x.device).unsqueeze(1)
        pooled = []
        for box, level in zip(ref.tolist(), levels, strict=True):
            rois = torch.cat([index, (index * 0 + 1) * x.new_tensor([box])], dim=1)
            pooled.append(
                roi_align(
                    maps[level],
                    rois,
                    output_size=pool.output_size,
                    spatial_scale=pool.scales[level],
                    sampling_ratio=pool.sampling_ratio,
                )
            )
        pooled_all = torch.stack(pooled, dim=1).flatten(0, 1)
        scores, reg = self.roi_heads.box_predictor(self.roi_heads.box_head(pooled_all))
        return (*objectness, *deltas, scores, reg)


def build_fasterrcnn(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    image_size: int = 800,
    max_size: int | None = None,
    fpn_channels: int = 256,
    widths: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    stem_width: int = 16,
    representation_size: int = 1024,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
    pretrained_backbone: str | None = None,
) -> FasterRCNN:
    """Build Faster R-CNN + FPN for ``num_classes`` foreground classes.

    The defaults are torchvision's (the papers' setting); the CPU-sized registry entry
    overrides proposals and RoIs per image, which dominate CPU training time.
    """
    body = resnet_fpn(
        backbone,
        fpn_channels,
        widths=widths,
        blocks=blocks,
        stem_width=stem_width,
        pretrained_backbone=pretrained_backbone,
    )
    ratios = ((0.5, 1.0, 2.0),) * len(anchor_sizes)
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ratios)
    rpn_head = RPNHead(fpn_channels, anchors.num_anchors_per_location()[0])
    box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
    predictor = FastRCNNPredictor(representation_size, num_classes + 1)
    model = PrunableFasterRCNN(
        body,
        num_classes=None,
        min_size=image_size,
        max_size=max_size or image_size,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        box_head=box_head,
        box_predictor=predictor,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
    )
    return model


def rois_per_image(model: nn.Module) -> int:
    """Proposals the box head sees per image at test time (for the FLOPs count)."""
    return int(model.rpn._post_nms_top_n["testing"])


# Settings of the CPU-sized configuration: at 128 px the cost of torchvision's R-CNN
# defaults (2000 proposals, 512 RoIs per image) is almost all RoIAlign backward, so the
# proposal and RoI budgets are cut, and anchors are scaled to 128 px images.
_CPU_RCNN = {
    "image_size": 128,
    "anchor_sizes": (12, 24, 48, 96, 160),
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 150,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 100,
    "rpn_batch_size_per_image": 128,
    "box_batch_size_per_image": 64,
}

_RCNN_PRUNING = {
    "backbone_kind": "resnet",
    "ignored_layers": FASTERRCNN_IGNORED,
    "per_roi_modules": ("roi_heads.box_head", "roi_heads.box_predictor"),
    "neck_outputs": ("backbone.fpn",),
    "cls_logits": ("rpn.head.cls_logits",),
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
        "head": ("rpn", "roi_heads"),
    },
    "distill_taps": {
        "backbone.body.layer1": "stride4",
        "backbone.body.layer2": "stride8",
        "backbone.body.layer3": "stride16",
        "backbone.body.layer4": "stride32",
        "backbone.fpn": "neck",
    },
}

FASTERRCNN_MODELS: dict[str, ModelEntry] = {
    "fasterrcnn_r50_fpn": ModelEntry(
        build_fasterrcnn,
        "Faster R-CNN, ResNet-50-FPN, torchvision defaults (800 px): the papers' setting",
        {"backbone": "resnet50"},
        image_size=800,
        **_RCNN_PRUNING,
    ),
    "fasterrcnn_r18_fpn": ModelEntry(
        build_fasterrcnn,
        "Faster R-CNN, ResNet-18-FPN (128 px, CPU proposal budget)",
        {"backbone": "resnet18", **_CPU_RCNN},
        image_size=128,
        **_RCNN_PRUNING,
    ),
    "fasterrcnn_narrow_fpn": ModelEntry(
        build_fasterrcnn,
        "Faster R-CNN, narrow ResNet (32-256 ch) + 64-ch FPN, 128 px: the default CPU run",
        {
            "backbone": "narrow",
            "widths": (32, 64, 128, 256),
            "blocks": (1, 1, 1, 1),
            "stem_width": 32,
            "fpn_channels": 64,
            "representation_size": 256,
            **_CPU_RCNN,
        },
        image_size=128,
        **_RCNN_PRUNING,
    ),
}
