"""Losses added during fine-tuning, selected by the schedule's ``distill`` key.

``DISTILLERS`` maps a name to a factory ``fn(student, teacher, spec, options) -> hook``
for :func:`detprune.train.engine.fit`; the hook receives (model, images, targets,
losses) and returns the losses with its terms added: distillation from the unpruned
teacher (``sad``) or an auxiliary network's loss (``lcp``).
"""

from __future__ import annotations

from detprune.pruning.lcp_loss import LCP_LOSSES
from detprune.train.distill_base import DistillFactory
from detprune.train.sad import SAD_LOSSES

DISTILLERS: dict[str, DistillFactory] = {**SAD_LOSSES, **LCP_LOSSES}
