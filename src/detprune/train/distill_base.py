"""The signature of a fine-tuning loss factory (registry: :mod:`detprune.train.distill`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from torch import nn

LossHook = Callable[[nn.Module, list, list, dict], dict]


class DistillFactory(Protocol):
    """``factory(student, teacher, spec, options, aux_heads=None) -> hook``; ``aux_heads``
    are the auxiliary-head state_dicts the pruned checkpoint carries, by feature module
    (:func:`detprune.train.checkpoint.aux_heads`; LCP's loss starts from them)."""

    def __call__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        spec: dict[str, Any],
        options: dict[str, Any],
        aux_heads: Mapping[str, Any] | None = None,
    ) -> LossHook: ...
