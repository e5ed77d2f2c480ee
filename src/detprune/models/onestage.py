"""One-stage FPN detectors: RetinaNet, FCOS (torchvision) and FSAF, ResNet + FPN P3-P7.

torchvision's RetinaNet and FCOS index their sigmoid class channels with the target
label itself (its COCO models have 91 channels, channel 0 never positive). Here the
heads have exactly K channels, one per foreground class, as in the papers: labels
1..K are shifted to channels 0..K-1 on the way in and back on the way out.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead

from detprune.models.backbones import resnet_fpn_p3p7
from detprune.models.base import ModelEntry
from detprune.models.fsaf import FSAF, FSAFHead, tower_norm, truncate_towers

Targets = list[dict[str, torch.Tensor]] | None


class ForegroundLabels:
    """Mixin: outside labels 1..K, inside the torchvision detector's channels 0..K-1."""

    def forward(self, images: list[torch.Tensor], targets: Targets = None) -> Any:
        if targets is not None:
            targets = [{**t, "labels": t["labels"] - 1} for t in targets]
        out = super().forward(images, targets)  # type: ignore[misc]
        if not self.training:  # type: ignore[attr-defined]
            out = [{**d, "labels": d["labels"] + 1} for d in out]
        return out


class ForegroundRetinaNet(ForegroundLabels, RetinaNet):
    """torchvision's RetinaNet with K sigmoid channels for labels 1..K."""


class ForegroundFCOS(ForegroundLabels, FCOS):
    """torchvision's FCOS with K sigmoid channels for labels 1..K."""


def retinanet_anchors(sizes: Sequence[int]) -> AnchorGenerator:
    """RetinaNet's anchors: 3 octave scales x 3 aspect ratios per level (torchvision's)."""
    scales = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
    return AnchorGenerator(scales, ((0.5, 1.0, 2.0),) * len(sizes))


def _common(
    num_classes: int,
    backbone: str,
    fpn_channels: int,
    widths: Sequence[int] | None,
    blocks: Sequence[int] | None,
    stem_width: int,
    pretrained_backbone: str | None,
) -> nn.Module:
    if num_classes < 1:
        raise ValueError(f"num_classes must count foreground classes (>= 1), got {num_classes}")
    return resnet_fpn_p3p7(
        backbone,
        fpn_channels,
        widths=widths,
        blocks=blocks,
        stem_width=stem_width,
        pretrained_backbone=pretrained_backbone,
    )


def build_retinanet(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    image_size: int = 800,
    max_size: int | None = None,
    fpn_channels: int = 256,
    widths: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    stem_width: int = 16,
    head_convs: int = 4,
    head_norm_groups: int | None = None,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 300,
    topk_candidates: int = 1000,
    pretrained_backbone: str | None = None,
    fsaf: bool = False,
    fsaf_weight: float = 0.5,
) -> nn.Module:
    """RetinaNet (Lin et al., ICCV 2017) or, with ``fsaf``, FSAF, for K = ``num_classes``.

    The defaults are torchvision's ``retinanet_resnet50_fpn`` (P6/P7 from P5, heads
    without normalization, 800 px); the CPU entries shrink widths and tower depth.
    ``head_norm_groups``: GroupNorm with that many groups after each tower conv (None:
    none, the paper's and torchvision's v1 head).
    """
    body = _common(
        num_classes, backbone, fpn_channels, widths, blocks, stem_width, pretrained_backbone
    )
    anchors = retinanet_anchors(anchor_sizes)
    num_anchors = anchors.num_anchors_per_location()[0]
    kwargs: dict[str, Any] = {
        "min_size": image_size,
        "max_size": max_size or image_size,
        "anchor_generator": anchors,
        "score_thresh": score_thresh,
        "nms_thresh": nms_thresh,
        "detections_per_img": detections_per_img,
        "topk_candidates": topk_candidates,
    }
    if fsaf:
        head = FSAFHead(
            fpn_channels,
            num_anchors,
            num_classes,
            num_convs=head_convs,
            norm_groups=head_norm_groups,
        )
        return FSAF(body, num_classes, head=head, af_weight=fsaf_weight, **kwargs)
    norm = tower_norm(head_norm_groups)
    head = RetinaNetHead(fpn_channels, num_anchors, num_classes, norm_layer=norm)
    head = truncate_towers(head, head_convs)
    return ForegroundRetinaNet(body, num_classes, head=head, **kwargs)


def build_fsaf(num_classes: int, **kwargs: Any) -> nn.Module:
    """FSAF (Zhu et al., CVPR 2019): RetinaNet + anchor-free branches, see :mod:`.fsaf`."""
    return build_retinanet(num_classes, fsaf=True, **kwargs)


# its keyword arguments are build_retinanet's (but ``fsaf``): what the model catalog lists
build_fsaf.__signature__ = inspect.signature(build_retinanet).replace(  # type: ignore[attr-defined]
    parameters=[
        p for p in inspect.signature(build_retinanet).parameters.values() if p.name != "fsaf"
    ]
)


def build_fcos(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    image_size: int = 800,
    max_size: int | None = None,
    fpn_channels: int = 256,
    widths: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    stem_width: int = 16,
    head_convs: int = 4,
    anchor_sizes: Sequence[int] = (8, 16, 32, 64, 128),
    center_sampling_radius: float = 1.5,
    gn_groups: int = 32,
    score_thresh: float = 0.2,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
    pretrained_backbone: str | None = None,
) -> nn.Module:
    """FCOS (Tian et al., ICCV 2019) for K = ``num_classes``: torchvision's defaults.

    ``anchor_sizes`` are FCOS's per-level sizes (= strides by default): they set the
    regression ranges (4x..8x the size) and the centre-sampling radius (x the size).
    ``gn_groups`` is the group count of the towers' GroupNorm (torchvision: 32).
    """
    body = _common(
        num_classes, backbone, fpn_channels, widths, blocks, stem_width, pretrained_backbone
    )
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs)
    if gn_groups != 32:
        for tower in (head.classification_head.conv, head.regression_head.conv):
            for i, m in enumerate(tower):
                if isinstance(m, nn.GroupNorm):
                    tower[i] = nn.GroupNorm(gn_groups, m.num_channels)
    return ForegroundFCOS(
        body,
        num_classes,
        min_size=image_size,
        max_size=max_size or image_size,
        anchor_generator=anchors,
        head=head,
        center_sampling_radius=center_sampling_radius,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=topk_candidates,
    )


# What the pruning methods see. The final prediction convs keep their channels; the
# towers and the FPN are prunable: torch-pruning traces a tower reused on the five
# levels as one module and prunes its channels for all levels at once (tested).
_FPN = ("backbone.fpn",)
_BODY_GROUPS = {
    "stride4": ("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"),
    "stride8": ("backbone.body.layer2",),
    "stride16": ("backbone.body.layer3",),
    "stride32": ("backbone.body.layer4",),
    "neck": _FPN,
    "head": ("head",),
}
_BODY_TAPS = {
    "backbone.body.layer1": "stride4",
    "backbone.body.layer2": "stride8",
    "backbone.body.layer3": "stride16",
    "backbone.body.layer4": "stride32",
    "backbone.fpn": "neck",
}
_AUX = (
    ("backbone.body.layer1", 4),
    ("backbone.body.layer2", 8),
    ("backbone.body.layer3", 16),
    ("backbone.body.layer4", 32),
)
_COMMON = {
    "backbone_kind": "resnet",
    "neck_outputs": _FPN,
    "aux_features": _AUX,
    "groups": _BODY_GROUPS,
    "distill_taps": _BODY_TAPS,
}
_RETINA = {
    **_COMMON,
    "ignored_layers": ("head.classification_head.cls_logits", "head.regression_head.bbox_reg"),
    "cls_logits": ("head.classification_head.cls_logits",),
}
_FSAF = {
    **_COMMON,
    "ignored_layers": (
        "head.classification_head.cls_logits",
        "head.regression_head.bbox_reg",
        "head.af_cls",
        "head.af_reg",
    ),
    "cls_logits": ("head.classification_head.cls_logits", "head.af_cls"),
}
_FCOS = {
    **_COMMON,
    "ignored_layers": (
        "head.classification_head.cls_logits",
        "head.regression_head.bbox_reg",
        "head.regression_head.bbox_ctrness",
    ),
    "cls_logits": ("head.classification_head.cls_logits",),
}

# The CPU-sized configurations: the narrow ResNet (32-256 channels, one block per
# stage) + a 64-channel FPN, 2 convs per tower, 128 px; anchors scaled to 128 px images.
_NARROW = {
    "backbone": "narrow",
    "widths": (32, 64, 128, 256),
    "blocks": (1, 1, 1, 1),
    "stem_width": 32,
    "fpn_channels": 64,
    "head_convs": 2,
    "image_size": 128,
}
# RetinaNet / FSAF on CPU: GroupNorm (4 groups of 16, as fcos_narrow_fpn) in the towers,
# as torchvision's RetinaNet v2 has; from scratch the papers' plain towers reached 5.8 / 8.8
# mAP on the default dataset, these 20.7 / 19.0 (3 seeds).
_NARROW_RETINA = {**_NARROW, "anchor_sizes": (16, 32, 64, 128, 256), "head_norm_groups": 4}
# The papers' schedule for the R50 entries: mmdetection's 1x (SGD lr 0.01 at batch 16,
# steps at epochs 8 and 11). The CPU entries train from scratch with the config's
# schedule at an lr chosen on the default dataset's val split (FCOS: the largest that stayed finite;
# RetinaNet / FSAF: the best of 0.02-0.08 over 3 seeds, see below).
_PAPER_SCHEDULE = {
    "epochs": 12,
    "batch_size": 16,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 0.0001,
    "warmup_iters": 500,
    "schedule": "step",
    "milestones": [8, 11],
}
# mmdetection's FSAF config clips the gradient norm at 10 (its RetinaNet does not).
_FSAF_PAPER_SCHEDULE = {**_PAPER_SCHEDULE, "clip_grad_norm": 10.0}
# On the default dataset (12 epochs, batch 8, 1 seed) RetinaNet and FSAF with the papers'
# plain towers went NaN at lr 0.02 (FSAF even with 300 warm-up iterations); FCOS (GroupNorm
# towers) and SSD did not. Plain towers, gradient norm clipped at 10, mAP RetinaNet / FSAF:
# lr 0.01 4.6 / 6.0, lr 0.02 5.8 / 8.8, lr 0.04 2.9 / 1.5; unclipped at lr 0.01 5.0 / 4.9.
# GroupNorm towers (below), clip 10, seed 0: lr 0.02 11.1 / 14.7, lr 0.04 17.0 / 21.1,
# lr 0.08 23.0 / 20.3; seeds 0-2 at lr 0.04 16.0 / 19.6, at lr 0.08 20.7 / 19.0
# (benchmarks/retina_cpu_towers.md).
_RETINA_CPU_SCHEDULE = {"lr": 0.08, "clip_grad_norm": 10.0}
_FCOS_CPU_SCHEDULE = {"lr": 0.02}

ONESTAGE_MODELS: dict[str, ModelEntry] = {
    "retinanet_r50_fpn": ModelEntry(
        build_retinanet,
        "RetinaNet, ResNet-50-FPN (P3-P7), torchvision defaults (800 px)",
        {"backbone": "resnet50"},
        image_size=800,
        schedule=_PAPER_SCHEDULE,
        **_RETINA,
    ),
    "retinanet_narrow_fpn": ModelEntry(
        build_retinanet,
        "RetinaNet, narrow ResNet + 64-ch FPN, 2-conv GN towers, 9 anchors from 16 px, 128 px",
        _NARROW_RETINA,
        image_size=128,
        schedule=_RETINA_CPU_SCHEDULE,
        **_RETINA,
    ),
    "fcos_r50_fpn": ModelEntry(
        build_fcos,
        "FCOS, ResNet-50-FPN (P3-P7), torchvision defaults (800 px)",
        {"backbone": "resnet50"},
        image_size=800,
        schedule=_PAPER_SCHEDULE,
        **_FCOS,
    ),
    # GroupNorm with 4 groups of 16 channels (the GN paper's 16 channels per group):
    # torch-pruning prunes GN channels group-wise, and with torchvision's 32 groups of the
    # 64-channel towers a pruned group could hold a single value on the 1x1 P7 map of a
    # 128 px image, which GroupNorm rejects.
    "fcos_narrow_fpn": ModelEntry(
        build_fcos,
        "FCOS, narrow ResNet + 64-ch FPN, 2-conv towers, level sizes 4-64, 128 px",
        {
            **_NARROW,
            "anchor_sizes": (4, 8, 16, 32, 64),
            "center_sampling_radius": 3.0,
            "gn_groups": 4,
        },
        image_size=128,
        schedule=_FCOS_CPU_SCHEDULE,
        **_FCOS,
    ),
    "fsaf_r50_fpn": ModelEntry(
        build_fsaf,
        "FSAF: RetinaNet R50-FPN + anchor-free branches, online level selection (800 px)",
        {"backbone": "resnet50"},
        image_size=800,
        schedule=_FSAF_PAPER_SCHEDULE,
        **_FSAF,
    ),
    "fsaf_narrow_fpn": ModelEntry(
        build_fsaf,
        "FSAF, narrow ResNet + 64-ch FPN, 2-conv GN towers, 9 anchors from 16 px, 128 px",
        _NARROW_RETINA,
        image_size=128,
        schedule=_RETINA_CPU_SCHEDULE,
        **_FSAF,
    ),
}
