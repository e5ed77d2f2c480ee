"""Faster R-CNN with FPN (torchvision), prunable backbone, neck and heads."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead

from detprune.models.backbones import resnet_fpn

# Layers whose output channels no method may prune: the final predictions (classes and
# box coordinates), and the FPN outputs with the RPN conv, whose channels are shared by
# the RPN head across all levels and by MultiScaleRoIAlign (torch-pruning does not trace
# that sharing through the reused head, so pruning it would break the model).
FASTERRCNN_IGNORED = (
    "backbone.fpn.layer_blocks.0.0",
    "backbone.fpn.layer_blocks.1.0",
    "backbone.fpn.layer_blocks.2.0",
    "backbone.fpn.layer_blocks.3.0",
    "rpn.head.conv.0.0",
    "rpn.head.cls_logits",
    "rpn.head.bbox_pred",
    "roi_heads.box_predictor.cls_score",
    "roi_heads.box_predictor.bbox_pred",
)


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
    model = FasterRCNN(
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
