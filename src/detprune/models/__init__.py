"""The model registry: ``MODELS`` maps a detector name to how to build it and what it
declares for pruning methods (layers never pruned, modules evaluated once per RoI)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from detprune.models.fasterrcnn import FASTERRCNN_IGNORED, build_fasterrcnn


@dataclass(frozen=True)
class ModelEntry:
    """One detector configuration and what it declares for the pruning methods.

    Module paths are ``model.get_submodule`` names. Models know nothing of methods; they
    only declare where things are:

    - ``ignored_layers``: layers whose output channels no method may prune;
    - ``per_roi_modules``: modules run once per RoI (their MACs scale with the RoI count);
    - ``neck_outputs``: module(s) whose outputs are the neck features (MIEP's FOI);
    - ``cls_logits``: module(s) producing per-position classification logits (FOI's
      Phi_obj), called once per pyramid level;
    - ``aux_features``: (module, stride) pairs whose outputs auxiliary networks attach to
      (DCP/LCP), shallow to deep;
    - ``groups``: GCP's groups by feature scale and module type, name -> module prefixes;
    - ``distill_taps``: module -> group name, the layers whose outputs SAD compares;
    - ``schedule``: the detector's default training schedule overrides.
    """

    build: Callable[..., nn.Module]
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    ignored_layers: tuple[str, ...] = ()
    per_roi_modules: tuple[str, ...] = ()
    image_size: int = 800
    neck_outputs: tuple[str, ...] = ()
    cls_logits: tuple[str, ...] = ()
    aux_features: tuple[tuple[str, int], ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    distill_taps: Mapping[str, str] = field(default_factory=dict)
    schedule: Mapping[str, Any] = field(default_factory=dict)


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

MODELS: dict[str, ModelEntry] = {
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


def model_kwargs(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The registry defaults of ``name`` updated with ``overrides`` from the config."""
    if name not in MODELS:
        raise KeyError(f"model.name: unknown detector {name!r}; known: {sorted(MODELS)}")
    kwargs = dict(MODELS[name].defaults)
    kwargs.update(overrides or {})
    return kwargs


def build_model(
    name: str, num_classes: int, overrides: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build detector ``name`` for ``num_classes`` foreground classes."""
    return MODELS[name].build(num_classes, **model_kwargs(name, overrides))


def ignored_modules(name: str, model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that no pruning method may shrink (final predictions)."""
    return [model.get_submodule(path) for path in MODELS[name].ignored_layers]
