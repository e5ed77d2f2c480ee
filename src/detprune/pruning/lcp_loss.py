"""LCP's auxiliary-network loss added during fine-tuning."""

from __future__ import annotations

from detprune.train.distill_base import DistillFactory

LCP_LOSSES: dict[str, DistillFactory] = {}
