"""The signature of a fine-tuning loss factory (registry: :mod:`detprune.train.distill`),
and how the engine finds the optimizers of a loss hook's own parameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
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


def hook_optimizers(hook: Any) -> list[torch.optim.Optimizer]:
    """The optimizers of a loss hook's own parameters (LCP's auxiliary head): what its
    ``optimizers()`` returns, ``[]`` for a hook without one. The engine zeroes them with the
    model's and steps them right after it, under AMP through the same GradScaler (unscaled
    gradients, a step with inf/NaN gradients skipped)."""
    fn = getattr(hook, "optimizers", None)
    return list(fn()) if callable(fn) else []
