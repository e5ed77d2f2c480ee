"""SSD (Liu et al., ECCV 2016) with a ResNet backbone, on torchvision's SSD machinery.

The ResNet-50 configuration is NVIDIA's SSD300 v1.1 (DeepLearningExamples, the SSD R50
of LCP and MIEP): ResNet-50 truncated after conv4_x (layer3) with the strides of
conv4_x set to 1, so the first feature map has stride 8 (38x38 at 300 px); then extra
blocks (1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU) down to 1x1; one 3x3 conv for classes
(K + 1, softmax with background 0, torchvision's convention) and one for box deltas
per level (torchvision's ``SSDHead``); default boxes from ``DefaultBoxGenerator``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

from detprune.models.backbones import resnet_body
from detprune.models.base import ModelEntry

# (mid channels, out channels, stride, padding) of each extra block.
EXTRAS_300 = (
    (256, 512, 2, 1),
    (256, 512, 2, 1),
    (128, 256, 2, 1),
    (128, 256, 1, 0),
    (128, 256, 1, 0),
)
EXTRAS_512 = (
    (256, 512, 2, 1),
    (256, 512, 2, 1),
    (128, 256, 2, 1),
    (128, 256, 2, 1),
    (128, 256, 2, 1),
    (128, 256, 2, 1),
)


class SSDResNetFeatures(nn.Module):
    """ResNet stem + layer1..layer3 at output stride 8, then SSD's extra blocks.

    Returns the feature maps of layer3 and of every extra block (an ``OrderedDict``).
    """

    def __init__(self, body: nn.Module, channels: int, extras: Sequence[Sequence[int]]) -> None:
        super().__init__()
        for name in ("layer4", "avgpool", "fc"):
            if hasattr(body, name):
                delattr(body, name)
        first = body.layer3[0]
        for m in first.modules():  # conv4_x at stride 1 (NVIDIA's SSD300 v1.1)
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
        self.body = body
        blocks = []
        in_ch = channels
        for mid, out, stride, pad in extras:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, mid, 1, bias=False),
                    nn.BatchNorm2d(mid),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(mid, out, 3, stride=stride, padding=pad, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                )
            )
            in_ch = out
        self.extra = nn.ModuleList(blocks)
        for m in self.extra.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
        self.out_channels = [channels] + [int(e[1]) for e in extras]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer3(b.layer2(b.layer1(x)))
        feats = [x]
        for block in self.extra:
            x = block(x)
            feats.append(x)
        return OrderedDict((str(i), f) for i, f in enumerate(feats))


def build_ssd(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    image_size: int = 300,
    widths: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    stem_width: int = 16,
    extras: Sequence[Sequence[int]] = EXTRAS_300,
    aspect_ratios: Sequence[Sequence[int]] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    scales: Sequence[float] = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05),
    steps: Sequence[int] | None = (8, 16, 32, 64, 100, 300),
    score_thresh: float = 0.01,
    nms_thresh: float = 0.45,
    detections_per_img: int = 200,
    topk_candidates: int = 400,
    iou_thresh: float = 0.5,
    pretrained_backbone: str | None = None,
) -> SSD:
    """SSD for K = ``num_classes`` foreground classes (the softmax has K + 1 outputs).

    Defaults: NVIDIA's SSD300 v1.1 (default boxes as torchvision's SSD300: scales
    21..315 px, steps 8..300). ``steps=None`` tiles the default boxes on the feature
    maps themselves, which suits any input size.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must count foreground classes (>= 1), got {num_classes}")
    if len(aspect_ratios) != len(extras) + 1:
        raise ValueError(
            f"model.aspect_ratios: {len(aspect_ratios)} levels, but layer3 + "
            f"{len(extras)} extra blocks make {len(extras) + 1}"
        )
    body, channels = resnet_body(
        backbone,
        widths=widths,
        blocks=blocks,
        stem_width=stem_width,
        pretrained_backbone=pretrained_backbone,
    )
    features = SSDResNetFeatures(body, channels[2], extras)
    anchors = DefaultBoxGenerator(
        [list(r) for r in aspect_ratios],
        scales=list(scales),
        steps=list(steps) if steps is not None else None,
    )
    head = SSDHead(features.out_channels, anchors.num_anchors_per_location(), num_classes + 1)
    return SSD(
        features,
        anchors,
        (image_size, image_size),
        num_classes + 1,
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=topk_candidates,
        iou_thresh=iou_thresh,
    )


def _ssd_declarations(levels: int) -> dict:
    """What the pruning methods see (module paths of :class:`SSDResNetFeatures`)."""
    cls = tuple(f"head.classification_head.module_list.{i}" for i in range(levels))
    reg = tuple(f"head.regression_head.module_list.{i}" for i in range(levels))
    return {
        "backbone_kind": "resnet",
        "ignored_layers": cls + reg,
        "neck_outputs": ("backbone",),
        "cls_logits": cls,
        "aux_features": (
            ("backbone.body.layer1", 4),
            ("backbone.body.layer2", 8),
            ("backbone.body.layer3", 8),
        ),
        "groups": {
            "stride4": ("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"),
            "stride8": ("backbone.body.layer2", "backbone.body.layer3"),
            "extra": ("backbone.extra",),
            "head": ("head",),
        },
        "distill_taps": {
            "backbone.body.layer1": "stride4",
            "backbone.body.layer2": "stride8",
            "backbone.body.layer3": "stride8",
            "backbone.extra": "extra",
        },
    }


# The CPU-sized configuration: the narrow ResNet (32-128 channels up to layer3, one block
# per stage), 4 extra blocks (16, 8, 4, 2, 1 at 128 px), default boxes at 0.1-0.8 of the
# image tiled on the feature maps.
_NARROW_SSD = {
    "backbone": "narrow",
    "widths": (32, 64, 128, 256),
    "blocks": (1, 1, 1, 1),
    "stem_width": 32,
    "image_size": 128,
    "extras": ((64, 128, 2, 1), (64, 128, 2, 1), (32, 64, 2, 1), (32, 64, 2, 1)),
    "aspect_ratios": ((2,), (2, 3), (2, 3), (2,), (2,)),
    "scales": (0.1, 0.2, 0.4, 0.6, 0.8, 1.0),
    "steps": None,
}

# NVIDIA's SSD300 v1.1 schedule: SGD lr 2.6e-3 per 32 images, 65 epochs, steps at 43 and
# 54, weight decay 5e-4, linear warm-up over 300 iterations.
_NVIDIA_SCHEDULE = {
    "epochs": 65,
    "batch_size": 32,
    "lr": 0.0026,
    "momentum": 0.9,
    "weight_decay": 0.0005,
    "warmup_iters": 300,
    "schedule": "step",
    "milestones": [43, 54],
}

SSD_MODELS: dict[str, ModelEntry] = {
    "ssd300_r50": ModelEntry(
        build_ssd,
        "SSD300, ResNet-50 to conv4_x at stride 8 + 5 extra blocks (NVIDIA SSD300 v1.1)",
        {"backbone": "resnet50"},
        image_size=300,
        schedule=_NVIDIA_SCHEDULE,
        **_ssd_declarations(6),
    ),
    "ssd512_r50": ModelEntry(
        build_ssd,
        "SSD512, ResNet-50 to conv4_x at stride 8 + 6 extra blocks (7 levels, 64..1)",
        {
            "backbone": "resnet50",
            "image_size": 512,
            "extras": EXTRAS_512,
            "aspect_ratios": ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
            "scales": (0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06),
            "steps": (8, 16, 32, 64, 128, 256, 512),
        },
        image_size=512,
        schedule=_NVIDIA_SCHEDULE,
        **_ssd_declarations(7),
    ),
    "ssd_narrow": ModelEntry(
        build_ssd,
        "SSD, narrow ResNet (32-128 ch to layer3, stride 8) + 4 extra blocks, 128 px",
        _NARROW_SSD,
        image_size=128,
        schedule={"lr": 0.02},
        **_ssd_declarations(5),
    ),
}
