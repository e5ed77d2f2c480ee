"""Distillation from the unpruned teacher during fine-tuning.

``DISTILLERS`` maps a name (the fine-tuning schedule's ``distill`` key) to a factory
``fn(student, teacher, spec, options) -> loss_hook`` for :func:`detprune.train.engine.fit`:
the hook receives (model, images, targets, losses) and returns the losses with the
distillation terms added.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

LossHook = Callable[[nn.Module, list, list, dict], dict]
DistillFactory = Callable[[nn.Module, nn.Module, dict[str, Any], dict[str, Any]], LossHook]

DISTILLERS: dict[str, DistillFactory] = {}
