"""The signature of a fine-tuning loss factory (registry: :mod:`detprune.train.distill`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

LossHook = Callable[[nn.Module, list, list, dict], dict]
DistillFactory = Callable[[nn.Module, nn.Module, dict[str, Any], dict[str, Any]], LossHook]
