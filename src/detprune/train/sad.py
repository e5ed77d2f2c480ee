"""Spatial-attention distillation (GCP+SAD)."""

from __future__ import annotations

from detprune.train.distill_base import DistillFactory

SAD_LOSSES: dict[str, DistillFactory] = {}
