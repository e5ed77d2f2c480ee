"""What a registry entry declares (the registry itself is :mod:`detprune.models`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn


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
    - ``schedule``: the detector's default training schedule overrides;
    - ``backbone_kind``: the backbone's kind for pretraining (``resnet``, ``cspdarknet53``,
      ``cspdarknet53_tiny``; see :mod:`detprune.backbone_init`), None for none;
    - ``task``: ``"detection"`` (boxes, COCO data and metrics) or ``"classification"``
      (an image classifier on ImageFolder data, top-1/top-5; see
      :mod:`detprune.models.classification`).
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
    task: str = "detection"
    backbone_kind: str | None = None
