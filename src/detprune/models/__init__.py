"""The model registry: ``MODELS`` maps a detector name to how to build it and what it
declares for the pruning methods (see :class:`detprune.models.base.ModelEntry`).

Each detector family lives in its own module and exports its entries; they are merged
here. Every detector follows torchvision's detection API: ``model(images, targets)`` in
train mode returns a dict of losses, ``model(images)`` in eval mode returns one dict of
``boxes`` (xyxy), ``scores`` and ``labels`` (1..K) per image. Classifiers (entries with
``task="classification"``, :mod:`detprune.models.classification`) follow the same API
with a classification loss and per-image ``scores`` (K probabilities) and ``labels``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from detprune.models.base import ModelEntry
from detprune.models.classification import CLASSIFICATION_MODELS
from detprune.models.fasterrcnn import FASTERRCNN_MODELS
from detprune.models.gfl import GFL_MODELS
from detprune.models.onestage import ONESTAGE_MODELS
from detprune.models.ssd import SSD_MODELS
from detprune.models.yolo import YOLO_MODELS

MODELS: dict[str, ModelEntry] = {
    **FASTERRCNN_MODELS,
    **SSD_MODELS,
    **ONESTAGE_MODELS,
    **GFL_MODELS,
    **YOLO_MODELS,
    **CLASSIFICATION_MODELS,
}

__all__ = ["MODELS", "ModelEntry", "build_model", "ignored_modules", "model_kwargs"]


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
